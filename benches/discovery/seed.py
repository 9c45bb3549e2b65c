"""Seeds moto with a converged fleet for `benches/discovery.rs`, then times one boto3 paginated describe.

Usage: seed.py ENDPOINT REGION TENANT FLEET MACS LINUX
  seed   makes MACS dedicated hosts, one mac2.metal instance on each, and LINUX t3.large instances, tagged as
         nimbus tags what it makes (tenant, provider `aws`, pool, machine, fleet, managed-by);
  time   prints the wall seconds of one paginated DescribeInstances of the tenant's live instances (1,000 per
         page, as nimbus asks), and how many it saw.
"""

import sys
import time

import boto3
from botocore.config import Config

cmd, endpoint, region, tenant, fleet = sys.argv[1:6]
ec2 = boto3.client(
    "ec2",
    endpoint_url=endpoint,
    region_name=region,
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
    # moto answers a filtered page of thousands of instances slowly; never time out, never retry.
    config=Config(read_timeout=3600, retries={"max_attempts": 1}),
)
az = region + "a"


def tags(pool, index):
    machine = f"nimbus.{tenant}.{pool}.{index}"
    return [
        {"Key": "nimbus:tenant", "Value": tenant},
        {"Key": "nimbus:provider", "Value": "aws"},
        {"Key": "nimbus:pool", "Value": pool},
        {"Key": "nimbus:machine", "Value": machine},
        {"Key": "nimbus:fleet", "Value": fleet},
        {"Key": "nimbus:managed-by", "Value": "nimbus"},
    ]


if cmd == "seed":
    macs, linux = int(sys.argv[6]), int(sys.argv[7])
    for i in range(macs):
        host = ec2.allocate_hosts(
            AvailabilityZone=az,
            InstanceType="mac2.metal",
            Quantity=1,
            TagSpecifications=[{"ResourceType": "dedicated-host", "Tags": tags("mac", i)}],
        )["HostIds"][0]
        ec2.run_instances(
            ImageId="ami-0abc",
            InstanceType="mac2.metal",
            MinCount=1,
            MaxCount=1,
            Placement={"HostId": host, "Tenancy": "host", "AvailabilityZone": az},
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags("mac", i)}],
        )
    # Linux instances in batches (one RunInstances per 500, as moto's per-call cost grows with what exists),
    # then each its own machine tag.
    done = 0
    while done < linux:
        n = min(500, linux - done)
        common = [t for t in tags("linux", 0) if t["Key"] != "nimbus:machine"]
        out = ec2.run_instances(
            ImageId="ami-0def",
            InstanceType="t3.large",
            MinCount=n,
            MaxCount=n,
            Placement={"AvailabilityZone": az},
            TagSpecifications=[{"ResourceType": "instance", "Tags": common}],
        )
        for j, inst in enumerate(out["Instances"]):
            machine = f"nimbus.{tenant}.linux.{done + j}"
            ec2.create_tags(Resources=[inst["InstanceId"]], Tags=[{"Key": "nimbus:machine", "Value": machine}])
        done += n
elif cmd == "time":
    filters = [
        {"Name": "tag:nimbus:tenant", "Values": [tenant]},
        {"Name": "tag:nimbus:managed-by", "Values": ["nimbus"]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped", "shutting-down"]},
    ]
    start = time.monotonic()
    seen = 0
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters, MaxResults=1000):
        for r in page["Reservations"]:
            seen += len(r["Instances"])
    print(f"{time.monotonic() - start:.3f} {seen}")
