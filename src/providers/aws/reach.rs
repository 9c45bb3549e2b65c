//! How nimbus reaches an EC2 machine over SSH.

use std::sync::Arc;

use super::TransportFactory;
use crate::providers::MachineRef;
use crate::transport::ssh::SshConnector;

/// Behind a `proxy_command` (SSM-style) `%h` is the instance id; otherwise nimbus connects to the machine's
/// address. Never a made-up address: a machine without one is not reachable.
pub fn over_ssh(ssh: Arc<SshConnector>) -> TransportFactory {
    let through_proxy = ssh.settings().proxy_command.is_some();
    Arc::new(move |m: &MachineRef| {
        let host = if through_proxy { m.instance_id.clone() } else { m.address.clone() }?;
        // Pinned under the instance id: an address can be reused by a later machine, an instance id cannot.
        let pin_as = m.instance_id.clone().unwrap_or_else(|| host.clone());
        Some(ssh.transport_pinned_as(&m.name, &host, &pin_as))
    })
}
