//! HTTP basic authentication against bcrypt hashes, as exporter-toolkit checks it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use http::HeaderValue;

#[derive(Debug)]
pub(super) struct BasicAuth {
    /// User name to bcrypt hash.
    users: Arc<BTreeMap<String, String>>,
    /// Credentials that verified already. bcrypt costs tens of milliseconds by design, and a
    /// Prometheus sends the same credentials with every scrape. Only correct credentials enter,
    /// so wrong guesses cannot grow it.
    verified: Mutex<HashSet<(String, String)>>,
}

impl BasicAuth {
    /// `None` without users: then every request is allowed.
    pub(super) fn new(users: BTreeMap<String, String>) -> Option<BasicAuth> {
        (!users.is_empty()).then(|| BasicAuth {
            users: Arc::new(users),
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// Whether an `Authorization` header carries the credentials of a configured user.
    pub(super) async fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(credentials) = authorization.and_then(credentials) else {
            return false;
        };
        if self.verified.lock().unwrap().contains(&credentials) {
            return true;
        }
        let users = self.users.clone();
        let (user, password) = credentials.clone();
        // bcrypt runs off the async thread, which keeps serving meanwhile. An unknown user is
        // checked against a known hash too, so the answer takes as long as for a known user,
        // and does not tell which names exist.
        let verified = tokio::task::spawn_blocking(move || {
            let (hash, known) = match users.get(&user) {
                Some(hash) => (hash, true),
                None => (users.values().next().unwrap(), false),
            };
            bcrypt::verify(&password, hash).unwrap_or(false) && known
        })
        .await
        .unwrap_or(false);
        if verified {
            self.verified.lock().unwrap().insert(credentials);
        }
        verified
    }
}

/// The user and password of a `Basic` authorization.
fn credentials(authorization: &HeaderValue) -> Option<(String, String)> {
    let value = authorization.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user_password: &str) -> HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_password);
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[test]
    fn only_a_configured_user_with_the_right_password_passes() {
        let hash = bcrypt::hash("right", 4).unwrap();
        // Go's and htpasswd's `$2y$` is the same algorithm as `$2b$`.
        let hash_2y = hash.replacen("$2b$", "$2y$", 1);
        let auth = BasicAuth::new(BTreeMap::from([
            ("prometheus".to_string(), hash),
            ("other".to_string(), hash_2y),
        ]))
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let allows = |value: Option<HeaderValue>| runtime.block_on(auth.allows(value.as_ref()));
        assert!(allows(Some(header("prometheus:right"))));
        // Again, from the cache.
        assert!(allows(Some(header("prometheus:right"))));
        assert!(allows(Some(header("other:right"))));
        assert!(!allows(Some(header("prometheus:wrong"))));
        assert!(!allows(Some(header("nobody:right"))));
        assert!(!allows(Some(header("prometheus"))));
        assert!(!allows(Some(HeaderValue::from_static("Bearer abc"))));
        assert!(!allows(Some(HeaderValue::from_static("Basic %%%"))));
        assert!(!allows(None));
        assert!(BasicAuth::new(BTreeMap::new()).is_none());
    }
}
