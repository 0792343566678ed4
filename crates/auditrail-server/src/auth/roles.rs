//! Permissions and the built-in roles. A principal's rights are the union of its grants; each
//! grant is a role, optionally limited to some projects. Built-in roles follow least privilege:
//! nobody but `admin` holds a permission their job does not need.

use serde::{Deserialize, Serialize};

macro_rules! permissions {
    ($($variant:ident = $name:literal: $doc:literal,)*) => {
        /// One thing a principal may do. The names are the API's and the documentation's.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Permission {
            $(#[doc = $doc] #[serde(rename = $name)] $variant,)*
        }

        impl Permission {
            pub const ALL: &'static [Permission] = &[$(Permission::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self { $(Permission::$variant => $name,)* }
            }

            pub fn describe(self) -> &'static str {
                match self { $(Permission::$variant => $doc,)* }
            }

            pub fn parse(s: &str) -> Option<Permission> {
                match s { $($name => Some(Permission::$variant),)* _ => None }
            }
        }
    };
}

permissions! {
    EventsWrite = "events:write": "Send events (native and FHIR ingest).",
    EventsRead = "events:read": "Search, count and read events (patient identifiers masked without events:patient_identifiers).",
    PatientIdentifiers = "events:patient_identifiers": "See patient identifiers in events unmasked.",
    EventsExport = "events:export": "Export events.",
    ReportsRun = "reports:run": "Run compliance reports.",
    AlertsManage = "alerts:manage": "Manage alert rules and acknowledge alerts.",
    IntegrityVerify = "integrity:verify": "Verify the log and read its proofs.",
    SecurityRead = "security:read": "Read the security status and the server's metrics.",
    RetentionManage = "retention:manage": "Run purges and place or release legal holds.",
    UsersManage = "users:manage": "Create, change, lock and reset users; grant roles; revoke sessions.",
    KeysManage = "keys:manage": "Create and revoke API keys.",
    SettingsManage = "settings:manage": "Change governance settings.",
    ProjectsCreate = "projects:create": "Create projects.",
    EmergencyAccess = "emergency:access": "Elevate for a bounded time, with a reason (break-glass).",
}

/// What break-glass elevation adds, for its bounded time: reading events with patient
/// identifiers and exporting them.
pub const EMERGENCY_GRANTS: &[Permission] =
    &[Permission::EventsRead, Permission::PatientIdentifiers, Permission::EventsExport];

/// The built-in roles and their permissions; they cannot be changed or deleted.
pub fn builtin(name: &str) -> Option<&'static [Permission]> {
    use Permission::*;
    Some(match name {
        "admin" => Permission::ALL,
        "security_officer" => &[
            EventsRead,
            PatientIdentifiers,
            EventsExport,
            ReportsRun,
            AlertsManage,
            IntegrityVerify,
            SecurityRead,
        ],
        "privacy_officer" => &[
            EventsRead,
            PatientIdentifiers,
            EventsExport,
            ReportsRun,
            IntegrityVerify,
            RetentionManage,
        ],
        "auditor" => &[EventsRead, PatientIdentifiers, ReportsRun, IntegrityVerify],
        "viewer" => &[EventsRead, EmergencyAccess],
        "ingest" => &[EventsWrite],
        _ => return None,
    })
}

pub const BUILTIN_ROLES: &[&str] =
    &["admin", "security_officer", "privacy_officer", "auditor", "viewer", "ingest"];

/// Role and project names: short, lowercase, safe in URLs and logs.
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_builtins_exist() {
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.as_str()), Some(*p));
            let json = serde_json::to_string(p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        for r in BUILTIN_ROLES {
            assert!(builtin(r).is_some(), "{r}");
        }
        assert!(!builtin("viewer").unwrap().contains(&Permission::PatientIdentifiers));
        assert_eq!(builtin("ingest").unwrap(), &[Permission::EventsWrite]);
    }
}
