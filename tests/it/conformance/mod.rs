//! Conformance suites: generic checks every provider and forge runs against its real test peer. A new
//! integration passes these before it lands (see `docs/extending.md`).

pub mod ec2_proxy;
pub mod forge;
pub mod forgejo_fake;
pub mod gitlab_fake;
pub mod hetzner_fake;
pub mod provider;
