//! The attributes of a resource before and after a change, as the plan shows them. Typed here, turned into
//! the document's JSON objects by [`Attrs::to_json`].

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

/// A resource's attributes on one side of a change: typed while planning, turned into the document's JSON object
/// only when printed or compared (a 100,000-machine plan builds tens of thousands of them; most are never shown).
/// A saved plan read back holds the JSON it was written with.
#[derive(Debug, Clone)]
pub enum Attrs {
    Machine(Box<MachineAttrs>),
    Host(HostAttrs),
    Runner(RunnerAttrs),
    /// Read back from a saved plan document.
    Json(serde_json::Value),
}

impl Attrs {
    /// The `provider` attribute, where the side has one (a machine's), without building its JSON.
    pub fn provider(&self) -> Option<&str> {
        match self {
            Attrs::Machine(a) => Some(&a.provider),
            Attrs::Host(_) | Attrs::Runner(_) => None,
            Attrs::Json(v) => v["provider"].as_str(),
        }
    }

    /// The document's JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Attrs::Json(v) => v.clone(),
            other => serde_json::to_value(other).expect("attributes serialise"),
        }
    }
}

impl From<MachineAttrs> for Attrs {
    fn from(a: MachineAttrs) -> Self {
        Attrs::Machine(Box::new(a))
    }
}

impl From<HostAttrs> for Attrs {
    fn from(a: HostAttrs) -> Self {
        Attrs::Host(a)
    }
}

impl From<RunnerAttrs> for Attrs {
    fn from(a: RunnerAttrs) -> Self {
        Attrs::Runner(a)
    }
}

impl From<serde_json::Value> for Attrs {
    fn from(v: serde_json::Value) -> Self {
        Attrs::Json(v)
    }
}

/// Equal when their JSON objects are (a typed side equals the same attributes read back from a document).
impl PartialEq for Attrs {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Attrs::Machine(a), Attrs::Machine(b)) => a == b,
            (Attrs::Host(a), Attrs::Host(b)) => a == b,
            (Attrs::Runner(a), Attrs::Runner(b)) => a == b,
            (Attrs::Json(a), Attrs::Json(b)) => a == b,
            (a, b) => a.to_json() == b.to_json(),
        }
    }
}

impl Serialize for Attrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Attrs::Machine(a) => a.serialize(s),
            Attrs::Host(a) => a.serialize(s),
            Attrs::Runner(a) => a.serialize(s),
            Attrs::Json(v) => v.serialize(s),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Attrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(d).map(Attrs::Json)
    }
}

/// In the published schema, any JSON value, as before attributes were typed.
impl schemars::JsonSchema for Attrs {
    fn inline_schema() -> bool {
        <serde_json::Value as schemars::JsonSchema>::inline_schema()
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        <serde_json::Value as schemars::JsonSchema>::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        <serde_json::Value as schemars::JsonSchema>::schema_id()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <serde_json::Value as schemars::JsonSchema>::json_schema(g)
    }
}
