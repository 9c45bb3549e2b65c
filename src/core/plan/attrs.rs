//! The attributes of a resource before and after a change, as the plan shows them. Typed here, turned into
//! the document's JSON objects by [`to_value`].

use serde::Serialize;

use crate::config::{Arch, Os};
use crate::core::model::{HostState, InstanceState};

/// A machine's attributes. Fields a side does not know are left out (`os`/`arch` before, `instance_id`/
/// `state` for a machine not made yet); `null` means known to be empty.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineAttrs {
    pub pool: Option<String>,
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<InstanceState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<Os>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    pub image: String,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    /// A host id, or `(new dedicated host)`.
    pub host: Option<String>,
    pub labels: Option<Vec<String>>,
    pub setup: Option<Vec<String>>,
    /// The user's tags (`tags:`), when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<std::collections::BTreeMap<String, String>>,
}

/// A dedicated host's attributes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostAttrs {
    pub instance_type: String,
    pub availability_zone: String,
    pub state: HostState,
    pub allocated_at: chrono::DateTime<chrono::Utc>,
}

/// A forge runner's attributes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunnerAttrs {
    pub id: u64,
    pub labels: Vec<String>,
    pub online: bool,
}

/// The document's JSON object for typed attributes.
pub fn to_value(a: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(a).expect("attributes serialise")
}
