//! The store's integration tests: behaviour through the public API, over a simulated disk or a
//! temporary directory.

mod basics;
mod crash;
mod rekey;
mod retention;
mod verify;

use auditrail_core::event::{ClientEvent, PreparedEvent};
use serde_json::json;

/// A small valid event; `i` makes it unique.
pub fn event(i: u64, id: Option<&str>) -> PreparedEvent {
    let mut v = json!({
        "occurred_at": "2026-11-22T10:15:00Z", "category": "phi_access", "action": "patient.read",
        "outcome": "success", "actor": {"user_id": format!("u{}", i % 7)},
        "source": {"system": "ehr"}, "patient": {"id": format!("MRN{i:08}")}
    });
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    ClientEvent::validate(v).unwrap().prepare().unwrap()
}
