//! The accounts database: users, custom roles, API keys, projects and governance settings. It is
//! small (people and systems, not events), so it is one JSON document sealed under the master
//! key (`auth/accounts.sealed`: password hashes and TOTP secrets never rest in the clear),
//! replaced atomically on every change. Sessions are not here: they live in memory.

use super::roles::{self, Permission};
use auditrail_store::keys::MasterKeys;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where the file is and what it is sealed for, declared with the store's other sealed files
/// so that a master key rewrap re-seals it.
const SEALED: auditrail_store::keys::SealedFile = auditrail_store::keys::ACCOUNTS;
pub const ACCOUNTS_PATH: &str = SEALED.path;
/// Where the bootstrap admin's one-time password is written (mode 0600).
pub const INITIAL_PASSWORD_PATH: &str = "auth/initial-admin-password";

/// A role granted to a principal, optionally only for some projects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Grant {
    pub role: String,
    /// The projects this grant covers; absent: every project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<BTreeSet<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Totp {
    /// The 160-bit secret (the file is sealed).
    pub secret: Vec<u8>,
    /// Confirmed by a first correct code; until then it does not protect logins.
    pub confirmed: bool,
    /// The last step accepted: a code is accepted once (RFC 6238 section 5.2).
    #[serde(default)]
    pub last_step: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub username: String,
    #[serde(default)]
    pub display_name: String,
    pub password_hash: String,
    pub must_change_password: bool,
    pub grants: Vec<Grant>,
    #[serde(default)]
    pub totp: Option<Totp>,
    /// SHA-256 digests of the unused recovery codes.
    #[serde(default)]
    pub recovery_codes: Vec<String>,
    #[serde(default)]
    pub failed_logins: u32,
    #[serde(default)]
    pub locked_until_ms: i64,
    #[serde(default)]
    pub disabled: bool,
    pub created_ms: i64,
    #[serde(default)]
    pub password_changed_ms: i64,
}

impl User {
    pub fn mfa_enrolled(&self) -> bool {
        self.totp.as_ref().is_some_and(|t| t.confirmed)
    }

    pub fn role_names(&self) -> Vec<String> {
        self.grants.iter().map(|g| g.role.clone()).collect()
    }

    /// What changes may show of a user: never a secret.
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "username": self.username,
            "display_name": self.display_name,
            "grants": self.grants,
            "mfa_enrolled": self.mfa_enrolled(),
            "must_change_password": self.must_change_password,
            "disabled": self.disabled,
            "locked_until": (self.locked_until_ms > 0)
                .then(|| auditrail_core::time::format_millis(self.locked_until_ms)),
            "created_at": auditrail_core::time::format_millis(self.created_ms),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// SHA-256 of the secret part.
    pub digest: String,
    /// What the key may do: permissions, not roles, so a key holds exactly what its system
    /// needs (`events:write` for an application).
    pub scopes: BTreeSet<Permission>,
    /// The projects the key may act on; absent: every project.
    #[serde(default)]
    pub projects: Option<BTreeSet<String>>,
    /// Source networks (CIDR) the key may be used from; empty: anywhere.
    #[serde(default)]
    pub networks: Vec<String>,
    pub created_ms: i64,
    pub created_by: String,
    #[serde(default)]
    pub revoked_ms: i64,
    #[serde(default)]
    pub last_used_ms: i64,
}

impl ApiKey {
    pub fn public(&self) -> serde_json::Value {
        let t = |ms: i64| (ms > 0).then(|| auditrail_core::time::format_millis(ms));
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "scopes": self.scopes,
            "projects": self.projects,
            "networks": self.networks,
            "created_at": t(self.created_ms),
            "created_by": self.created_by,
            "revoked_at": t(self.revoked_ms),
            "last_used_at": t(self.last_used_ms),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomRole {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub permissions: BTreeSet<Permission>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    pub created_ms: i64,
    pub created_by: String,
}

/// The governance toggles of DESIGN.md; every change is an audited event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Governance {
    /// Only holders of the `admin` role may create projects (otherwise `projects:create`
    /// suffices).
    pub only_admins_create_projects: bool,
    /// Exports may go only to the configured object storage, not to the caller.
    pub local_export_disabled: bool,
    /// Projects still allowed to export locally while local export is disabled.
    pub local_export_exceptions: BTreeSet<String>,
    /// Uploading files of events for import is refused.
    pub local_import_disabled: bool,
    /// Projects still allowed to import locally while local import is disabled.
    pub local_import_exceptions: BTreeSet<String>,
}

impl Default for Governance {
    fn default() -> Governance {
        Governance {
            only_admins_create_projects: true,
            local_export_disabled: false,
            local_export_exceptions: BTreeSet::new(),
            local_import_disabled: false,
            local_import_exceptions: BTreeSet::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Accounts {
    pub users: Vec<User>,
    pub roles: Vec<CustomRole>,
    pub api_keys: Vec<ApiKey>,
    pub projects: Vec<Project>,
    pub governance: Governance,
}

impl Accounts {
    pub fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    pub fn user_mut(&mut self, id: &str) -> Option<&mut User> {
        self.users.iter_mut().find(|u| u.id == id)
    }

    pub fn user_by_name(&self, username: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username.eq_ignore_ascii_case(username))
    }

    /// The permissions of a role, built-in or custom.
    pub fn role_permissions(&self, role: &str) -> Option<BTreeSet<Permission>> {
        if let Some(p) = roles::builtin(role) {
            return Some(p.iter().copied().collect());
        }
        self.roles.iter().find(|r| r.name == role).map(|r| r.permissions.clone())
    }

    /// Each grant as (permissions, projects).
    pub fn resolve(
        &self,
        grants: &[Grant],
    ) -> Vec<(BTreeSet<Permission>, Option<BTreeSet<String>>)> {
        grants
            .iter()
            .filter_map(|g| Some((self.role_permissions(&g.role)?, g.projects.clone())))
            .collect()
    }
}

/// Reads and writes the sealed accounts file.
#[derive(Debug, Clone)]
pub struct AccountsFile {
    path: PathBuf,
    keys: MasterKeys,
}

impl AccountsFile {
    pub fn new(data: &Path, keys: MasterKeys) -> AccountsFile {
        AccountsFile { path: data.join(ACCOUNTS_PATH), keys }
    }

    /// `None` when there is no file yet (a new data directory).
    pub fn load(&self) -> Result<Option<Accounts>, String> {
        let sealed = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        let plain = self
            .keys
            .open_blob(SEALED.purpose, &sealed)
            .map_err(|e| format!("{}: {e} (wrong master key?)", self.path.display()))?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|e| format!("{}: not an accounts document: {e}", self.path.display()))
    }

    /// Replaces the file atomically and durably: temp file, fsync, rename, fsync directory.
    pub fn save(&self, accounts: &Accounts) -> Result<(), String> {
        let plain = serde_json::to_vec(accounts).map_err(|e| e.to_string())?;
        write_private_file(&self.path, &self.keys.seal_blob(SEALED.purpose, &plain))
    }
}

/// Writes `bytes` to `path` with mode 0600, atomically (temp, fsync, rename, fsync dir).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    let dir = path.parent().ok_or("a file path needs a directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let result = opts
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path))
        .and_then(|_| std::fs::File::open(dir).and_then(|d| d.sync_all()));
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Checks a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub fn parse_network(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a.parse::<std::net::IpAddr>().ok()?, b.parse::<u8>().ok()?),
        None => {
            let a = s.parse::<std::net::IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((addr, bits))
}

pub fn network_contains(network: &str, ip: std::net::IpAddr) -> bool {
    let Some((net, bits)) = parse_network(network) else { return false };
    // Compare IPv4-mapped IPv6 clients as IPv4.
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    match (net, ip) {
        (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// A summary of who holds what, for `before`/`after` in change events.
pub fn grants_map(grants: &[Grant]) -> BTreeMap<String, Option<BTreeSet<String>>> {
    grants.iter().map(|g| (g.role.clone(), g.projects.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_by_prefix() {
        let ip = |s: &str| s.parse().unwrap();
        assert!(network_contains("10.0.0.0/8", ip("10.200.1.2")));
        assert!(!network_contains("10.0.0.0/8", ip("11.0.0.1")));
        assert!(network_contains("127.0.0.1", ip("127.0.0.1")));
        assert!(network_contains("127.0.0.0/8", ip("::ffff:127.0.0.1")));
        assert!(network_contains("2001:db8::/32", ip("2001:db8::1")));
        assert!(!network_contains("2001:db8::/32", ip("10.0.0.1")));
        assert!(network_contains("0.0.0.0/0", ip("8.8.8.8")));
        assert!(parse_network("10.0.0.0/33").is_none() && parse_network("nope").is_none());
    }
}
