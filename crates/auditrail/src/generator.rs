//! A realistic audit-event generator for benchmarks: thousands of users, tens of thousands of
//! patients with skewed popularity (a few are looked at constantly), mostly reads, a few per
//! cent failures, about 400 bytes per event. Seeded, so runs are comparable.

use auditrail_store::sim::Rng;
use serde_json::json;

pub struct Generator {
    rng: Rng,
    users: u64,
    patients: u64,
    /// Milliseconds since the epoch of the next event's `occurred_at`.
    clock_ms: i64,
}

const SITES: [&str; 4] = ["main-campus", "north-clinic", "imaging-center", "telehealth"];
const ROLES: [&str; 5] = ["physician", "nurse", "radiologist", "annotator", "admin"];
const RESOURCES: [&str; 5] =
    ["Observation", "ImagingStudy", "DiagnosticReport", "MedicationRequest", "Encounter"];

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator {
            rng: Rng::new(seed),
            users: 5_000,
            patients: 50_000,
            clock_ms: 1_795_342_500_000,
        }
    }

    /// A patient number with log-uniform (heavily skewed) popularity.
    fn patient(&mut self) -> u64 {
        let u = self.rng.below(1 << 20) as f64 / (1u64 << 20) as f64;
        ((self.patients as f64).powf(u) as u64).min(self.patients - 1)
    }

    /// One event as a JSON line (no trailing newline).
    pub fn next_line(&mut self) -> String {
        self.clock_ms += self.rng.below(20) as i64;
        let user = self.rng.below(self.users);
        let patient = self.patient();
        let roll = self.rng.below(1000);
        let resource = RESOURCES[self.rng.below(RESOURCES.len() as u64) as usize];
        let object = self.rng.below(10_000_000);
        let (category, action, method, status, failure) = match roll {
            0..=699 => ("phi_access", "patient.read", "GET", 200, false),
            700..=779 => ("phi_access", "patient.search", "GET", 200, false),
            780..=829 => ("phi_modify", "patient.update", "PUT", 200, false),
            830..=879 => ("authentication", "login.success", "POST", 200, false),
            880..=909 => ("authentication", "login.failure", "POST", 401, true),
            910..=929 => ("phi_access", "patient.read", "GET", 403, true),
            930..=949 => ("export", "data.export", "POST", 202, false),
            950..=979 => ("authentication", "session.validate", "GET", 200, false),
            _ => ("configuration", "settings.update", "PATCH", 200, false),
        };
        let mut v = json!({
            "occurred_at": auditrail_core::time::format_millis(self.clock_ms),
            "category": category,
            "action": action,
            "outcome": if failure { "failure" } else { "success" },
            "actor": {
                "user_id": format!("u{user:06}"),
                "roles": [ROLES[(user % 5) as usize]],
                "ip": format!("10.{}.{}.{}", user % 7, user % 251, (user * 7) % 253),
                "session_id": format!("s{:08x}", user * 7919 + self.clock_ms as u64 / 3_600_000),
            },
            "source": {"system": "ehr", "site": SITES[(user % 4) as usize]},
            "request": {"method": method, "path": format!("/api/patients/{patient}"), "status": status},
        });
        if category.starts_with("phi") || category == "export" {
            v["patient"] = json!({"id": format!("MRN{patient:08}"), "system": "urn:oid:2.16.840.1.113883.3.0"});
            v["entities"] = json!([{"type": resource, "id": object.to_string(), "role": "domain"}]);
            v["purpose_of_use"] = json!("TREAT");
        }
        if action == "patient.update" || action == "settings.update" {
            v["changes"] = json!([{"field": "status", "before": "preliminary", "after": "final"}]);
        }
        v.to_string()
    }
}
