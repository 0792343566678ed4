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
    /// Mean milliseconds between consecutive events' `occurred_at`.
    step_ms: u64,
}

/// One year, the span a benchmark's events cover by default (so "the last year" and "the last
/// 30 days" select what they would in production).
pub const YEAR_MS: i64 = 365 * 86_400_000;

const SITES: [&str; 4] = ["main-campus", "north-clinic", "imaging-center", "telehealth"];
const ROLES: [&str; 5] = ["physician", "nurse", "radiologist", "annotator", "admin"];
const RESOURCES: [&str; 5] =
    ["Observation", "ImagingStudy", "DiagnosticReport", "MedicationRequest", "Encounter"];

impl Generator {
    /// `events` events whose `occurred_at` spread evenly over the `span_ms` before `end_ms`.
    pub fn new(seed: u64, events: u64, span_ms: i64, end_ms: i64) -> Generator {
        Generator {
            rng: Rng::new(seed),
            users: 5_000,
            patients: 50_000,
            clock_ms: end_ms - span_ms,
            step_ms: (span_ms.max(0) as u64 / events.max(1)).max(1),
        }
    }

    /// A patient number with log-uniform (heavily skewed) popularity.
    fn patient(&mut self) -> u64 {
        let u = self.rng.below(1 << 20) as f64 / (1u64 << 20) as f64;
        ((self.patients as f64).powf(u) as u64).min(self.patients - 1)
    }

    /// A patient identifier drawn with the workload's skew, as a lookup would ask for it.
    pub fn patient_id(&mut self) -> String {
        format!("MRN{:08}", self.patient())
    }

    /// One event as a JSON line (no trailing newline).
    pub fn next_line(&mut self) -> String {
        // Jitter around the mean step keeps timestamps irregular but the span exact on average.
        self.clock_ms += self.rng.below(2 * self.step_ms) as i64;
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

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
