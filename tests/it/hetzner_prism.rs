//! Contract tests for the Hetzner provider: every request shape it sends (and the stateful fake accepts, see
//! `conformance/hetzner_fake.rs`) goes to Prism serving the Hetzner Cloud API description
//! (`specs/hetzner/hcloud.json`), which validates it, and Prism's example answers are read by the provider's
//! own parsers.

use nimbus::config::{Arch, Os};
use nimbus::core::model::MachineSpec;
use nimbus::providers::LaunchRequest;
use nimbus::providers::hetzner::{HetznerProvider, HetznerSettings, label_key, label_value};

use crate::common::*;

fn provider(url: &str) -> HetznerProvider {
    let mut s = HetznerSettings::new(url, "test-token");
    s.location = Some("fsn1".into());
    s.ssh_keys = vec!["nimbus".into()];
    s.user_data = Some("#cloud-config\n".into());
    s.attempts = 1;
    HetznerProvider::new("hetzner", "acme", s)
        .unwrap()
        .with_fleet(nimbus::core::model::FleetScope { id: "fleets/linux.yaml".into(), ..Default::default() })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn every_hetzner_request_validates_against_the_spec() {
    let Some(url) = peer("NIMBUS_PRISM_HETZNER_URL", "Prism (Hetzner Cloud API)") else { return };
    let p = provider(&url);
    let req = LaunchRequest {
        tenant: "acme".into(),
        pool: "linux".into(),
        machine: "nimbus.acme.linux.0".into(),
        spec: MachineSpec {
            os: Os::Linux,
            arch: Arch::X86_64,
            instance_type: Some("cx22".into()),
            image: "ubuntu-24.04".into(),
            availability_zone: None,
            fallback_zones: vec![],
            tags: Default::default(),
        },
        host_id: None,
        idempotency_key: None,
    };
    rt().block_on(async {
        // GET /servers with the tenant's label selector, paged.
        let selector = format!("{}={}", label_key("nimbus:tenant"), label_value("acme"));
        let (status, v) = p.request("GET", &p.list_path(&selector, 1), None).await.expect("GET /servers validates");
        assert_eq!(status, 200);
        assert!(!HetznerProvider::parse_servers(&v).unwrap().is_empty(), "the example server reads: {v}");
        // POST /servers, as a launch sends it (labels encoded, location, ssh keys, user data).
        let body = p.create_body(&req);
        assert_eq!(body["labels"]["nimbus/fleet"], "fleets_2flinux.yaml", "{body}");
        let (status, v) = p.request("POST", "/servers", Some(body)).await.expect("POST /servers validates");
        assert_eq!(status, 201);
        assert!(HetznerProvider::parse_action(&v["action"]).is_ok(), "{v}");
        // GET /servers/{id}, DELETE /servers/{id}, the rebuild, and the action poll.
        let (_, v) = p.request("GET", "/servers/42", None).await.expect("GET /servers/{id} validates");
        assert!(v["server"]["id"].is_u64());
        let (_, v) = p.request("DELETE", "/servers/42", None).await.expect("DELETE /servers/{id} validates");
        assert!(HetznerProvider::parse_action(&v["action"]).is_ok(), "{v}");
        let (_, v) = p
            .request("POST", "/servers/42/actions/rebuild", Some(serde_json::json!({"image": "ubuntu-24.04"})))
            .await
            .expect("the rebuild validates");
        assert!(HetznerProvider::parse_action(&v["action"]).is_ok(), "{v}");
        let (_, v) = p.request("GET", "/actions/42", None).await.expect("GET /actions/{id} validates");
        assert!(HetznerProvider::parse_action(&v["action"]).is_ok(), "{v}");
    });
}

/// The contract check has teeth: Prism refuses what the description does not allow.
#[test]
fn prism_refuses_what_the_hetzner_spec_does_not_allow() {
    let Some(url) = peer("NIMBUS_PRISM_HETZNER_URL", "Prism (Hetzner Cloud API)") else { return };
    let p = provider(&url);
    let e = rt()
        .block_on(p.request("POST", "/servers", Some(serde_json::json!({"name": "x", "labels": {"a": 1}}))))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 4"), "{e}");
}

/// Label values are what Hetzner allows, and come back as they were.
#[test]
fn labels_round_trip() {
    for v in ["acme", "nimbus.acme.linux.0", "fleets/linux.yaml", "a_b", "x y%z"] {
        let l = label_value(v);
        assert!(l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{l}");
        assert_eq!(nimbus::providers::hetzner::from_label_value(&l), v);
    }
    let long = "f".repeat(100);
    assert_eq!(label_value(&long).len(), 63);
}
