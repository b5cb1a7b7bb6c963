//! Roles, callers and bearer-token checks. Static tokens (admin, app) come from configuration and
//! are compared in constant time; worker tokens are HMAC-SHA256 signatures over the worker id,
//! so a worker is authenticated as exactly one workerId without any stored state.
//!
//! Rotation: besides the current token of each role, the previous ones
//! (`auth.previous_admin_tokens`, `auth.previous_app_tokens`) are accepted, and worker tokens
//! signed with a previous key (`auth.previous_worker_token_keys`) still verify; new worker
//! tokens are always signed with the current key.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::OpError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    App,
    Worker,
    Telegram,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::App => "app",
            Self::Worker => "worker",
            Self::Telegram => "telegram",
        }
    }
}

/// Who is calling. A worker caller always carries the workerId its token was minted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    pub worker_id: Option<String>,
}

impl Caller {
    pub fn admin() -> Self {
        Self { role: Role::Admin, worker_id: None }
    }

    /// Refuses a worker caller acting for another workerId. Other roles pass.
    pub fn require_worker(&self, worker_id: &str) -> Result<(), OpError> {
        match (&self.role, &self.worker_id) {
            (Role::Worker, Some(own)) if own == worker_id => Ok(()),
            (Role::Worker, _) => {
                Err(OpError::forbidden(format!("this worker token may not act for worker '{worker_id}'")))
            }
            _ => Ok(()),
        }
    }
}

const WORKER_TOKEN_PREFIX: &str = "afw1";

/// Verifies bearer tokens. Holds only what configuration provides; a role without a configured
/// token cannot be used at all.
pub struct Authenticator {
    /// Digests of the accepted admin tokens: the current one, then the previous ones.
    admin: Vec<[u8; 32]>,
    app: Vec<[u8; 32]>,
    /// HMAC-SHA256 already keyed with `auth.worker_token_key`: each use clones it, so a request
    /// pays for its own message only, not for hashing the key again.
    worker_mac: Option<Hmac<Sha256>>,
    /// Keyed with each of `auth.previous_worker_token_keys`: verify only.
    previous_worker_macs: Vec<Hmac<Sha256>>,
}

fn digest(s: &SecretString) -> [u8; 32] {
    Sha256::digest(s.expose_secret().as_bytes()).into()
}

fn keyed(key: &SecretString) -> Option<Hmac<Sha256>> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret().as_bytes()).ok()
}

/// Whether `presented` equals one of `accepted`, comparing against every one of them in
/// constant time so timing reveals neither which one matched nor how many there are to try.
fn matches_any(accepted: &[[u8; 32]], presented: &[u8; 32]) -> bool {
    accepted.iter().fold(subtle::Choice::from(0), |found, d| found | d.ct_eq(presented)).into()
}

impl Authenticator {
    pub fn new(admin: Option<&SecretString>, app: Option<&SecretString>, worker_key: Option<&SecretString>) -> Self {
        Self {
            admin: admin.map(digest).into_iter().collect(),
            app: app.map(digest).into_iter().collect(),
            worker_mac: worker_key.and_then(keyed),
            previous_worker_macs: Vec::new(),
        }
    }

    /// Everything `auth` configures: the current tokens and key, and the previous ones that are
    /// still accepted during a rollover.
    pub fn from_settings(auth: &crate::config::AuthSettings) -> Self {
        let mut out = Self::new(auth.admin_token.as_ref(), auth.app_token.as_ref(), auth.worker_token_key.as_ref());
        out.admin.extend(auth.previous_admin_tokens.iter().map(digest));
        out.app.extend(auth.previous_app_tokens.iter().map(digest));
        out.previous_worker_macs = auth.previous_worker_token_keys.iter().filter_map(keyed).collect();
        out
    }

    /// Whether one of the accepted admin tokens has this [`crate::audit::fingerprint`]: a
    /// console session records the fingerprint of the token that opened it, and ends when a
    /// rotation stops accepting that token.
    pub fn accepts_admin_fingerprint(&self, fingerprint: &str) -> bool {
        self.admin.iter().any(|d| crate::audit::digest_fingerprint(d).as_bytes().ct_eq(fingerprint.as_bytes()).into())
    }

    /// Authenticates the value of an `Authorization` header, which must be `Bearer <token>`
    /// (the scheme in any case, one token without spaces).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, OpError> {
        let Some(raw) = authorization.map(str::trim).filter(|s| !s.is_empty()) else {
            return Err(OpError::unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'"));
        };
        let token = match raw.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => token,
            _ => return Err(OpError::unauthenticated("malformed authorization: send 'Authorization: Bearer <token>'")),
        };
        if token.contains(char::is_whitespace) {
            return Err(OpError::unauthenticated("malformed authorization: send 'Authorization: Bearer <token>'"));
        }
        if let Some(worker_id) = self.verify_worker_token(token) {
            return Ok(Caller { role: Role::Worker, worker_id: Some(worker_id) });
        }
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every comparison always runs so timing does not reveal which role or token matched.
        let is_admin = matches_any(&self.admin, &presented);
        let is_app = matches_any(&self.app, &presented);
        match (is_admin, is_app) {
            (true, _) => Ok(Caller::admin()),
            (false, true) => Ok(Caller { role: Role::App, worker_id: None }),
            (false, false) => Err(OpError::unauthenticated("invalid bearer token")),
        }
    }

    /// Mints the token a spawned worker uses to act as `worker_id`.
    pub fn mint_worker_token(&self, worker_id: &str) -> Result<String, OpError> {
        let mut mac = self.worker_mac.clone().ok_or_else(|| {
            OpError::unavailable("auth.worker_token_key is not configured; worker tokens cannot be issued")
        })?;
        mac.update(worker_id.as_bytes());
        let id = URL_SAFE_NO_PAD.encode(worker_id.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{WORKER_TOKEN_PREFIX}.{id}.{sig}"))
    }

    fn verify_worker_token(&self, token: &str) -> Option<String> {
        self.worker_mac.as_ref()?;
        let mut parts = token.split('.');
        let (Some(WORKER_TOKEN_PREFIX), Some(id), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let worker_id = String::from_utf8(URL_SAFE_NO_PAD.decode(id).ok()?).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        // The current key first, then the previous ones (each check is constant-time).
        let verified = self.worker_mac.iter().chain(&self.previous_worker_macs).any(|mac| {
            let mut mac = mac.clone();
            mac.update(worker_id.as_bytes());
            mac.verify_slice(&sig).is_ok()
        });
        verified.then_some(worker_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(
            Some(&SecretString::from("admin-secret")),
            Some(&SecretString::from("app-secret")),
            Some(&SecretString::from("worker-key")),
        )
    }

    #[test]
    fn static_tokens_map_to_roles() {
        let a = auth();
        assert_eq!(a.authenticate(Some("Bearer admin-secret")).unwrap().role, Role::Admin);
        assert_eq!(a.authenticate(Some("bearer app-secret")).unwrap().role, Role::App);
        // No scheme, another scheme, or a second word: refused, even with a valid token.
        for malformed in ["app-secret", "Basic app-secret", "Bearer app-secret extra", "Bearer  app-secret", "Bearer"] {
            assert!(a.authenticate(Some(malformed)).is_err(), "{malformed}");
        }
        assert!(a.authenticate(Some("Bearer nope")).is_err());
        assert!(a.authenticate(None).is_err());
        assert!(a.authenticate(Some("  ")).is_err());
    }

    #[test]
    fn worker_tokens_bind_one_worker_id() {
        let a = auth();
        let token = a.mint_worker_token("afw-1767258000000-0").unwrap();
        let caller = a.authenticate(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(caller.role, Role::Worker);
        assert_eq!(caller.worker_id.as_deref(), Some("afw-1767258000000-0"));
        assert!(caller.require_worker("afw-1767258000000-0").is_ok());
        assert!(caller.require_worker("afw-other").is_err());

        // A token signed with another key, or with a swapped id, is refused.
        let other = Authenticator::new(None, None, Some(&SecretString::from("other-key")));
        let forged = other.mint_worker_token("afw-1767258000000-0").unwrap();
        assert!(a.authenticate(Some(&forged)).is_err());
        let parts: Vec<&str> = token.split('.').collect();
        let swapped = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode("afw-x"), parts[2]);
        assert!(a.authenticate(Some(&swapped)).is_err());
    }

    #[test]
    fn previous_tokens_and_worker_keys_are_accepted_during_a_rollover() {
        let old = auth();
        let old_worker = old.mint_worker_token("afw-1").unwrap();
        let settings = crate::config::AuthSettings {
            admin_token: Some(SecretString::from("admin-secret-new")),
            app_token: Some(SecretString::from("app-secret-new")),
            worker_token_key: Some(SecretString::from("worker-key-new")),
            previous_admin_tokens: vec![SecretString::from("admin-secret")],
            previous_app_tokens: vec![SecretString::from("app-secret")],
            previous_worker_token_keys: vec![SecretString::from("worker-key")],
        };
        let rolling = Authenticator::from_settings(&settings);
        for (token, role) in [
            ("admin-secret", Role::Admin),
            ("admin-secret-new", Role::Admin),
            ("app-secret", Role::App),
            ("app-secret-new", Role::App),
        ] {
            assert_eq!(rolling.authenticate(Some(&format!("Bearer {token}"))).unwrap().role, role, "{token}");
        }
        let caller = rolling.authenticate(Some(&format!("Bearer {old_worker}"))).unwrap();
        assert_eq!(caller.worker_id.as_deref(), Some("afw-1"));
        // New worker tokens are signed with the current key: the old process does not take them.
        let new_worker = rolling.mint_worker_token("afw-2").unwrap();
        assert!(old.authenticate(Some(&format!("Bearer {new_worker}"))).is_err());
        assert!(rolling.authenticate(Some(&format!("Bearer {new_worker}"))).is_ok());

        let done = Authenticator::from_settings(&crate::config::AuthSettings {
            previous_admin_tokens: vec![],
            previous_app_tokens: vec![],
            previous_worker_token_keys: vec![],
            ..settings
        });
        assert!(done.authenticate(Some("Bearer admin-secret")).is_err());
        assert!(done.authenticate(Some("Bearer app-secret")).is_err());
        assert!(done.authenticate(Some(&format!("Bearer {old_worker}"))).is_err());
        assert!(done.authenticate(Some(&format!("Bearer {new_worker}"))).is_ok());
    }

    #[test]
    fn unconfigured_roles_cannot_be_used() {
        let a = Authenticator::new(None, None, None);
        assert!(a.authenticate(Some("")).is_err());
        assert!(a.mint_worker_token("w").is_err());
    }
}
