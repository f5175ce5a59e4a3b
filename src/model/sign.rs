//! Standard Webhooks signatures (the scheme Supabase Auth Hooks use):
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Signing keys, decoded. More than one while a secret is being rotated.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys(Vec<Vec<u8>>);

// Never print key material, even in debug output.
impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} hidden)", self.0.len())
    }
}

/// Parses `whsec_<base64>` secrets separated by spaces. Errors never contain the secret.
pub fn parse(secrets: &str, setting: &str) -> Result<Keys, String> {
    let mut keys = Vec::new();
    for (n, secret) in secrets.split_whitespace().enumerate() {
        let encoded = secret.strip_prefix("whsec_").ok_or_else(|| {
            format!("{setting}: secret #{} does not start with whsec_ (expected whsec_<base64>, as Supabase shows it)", n + 1)
        })?;
        let key = STANDARD.decode(encoded).map_err(|e| {
            format!(
                "{setting}: secret #{} is not valid base64 after whsec_ ({e})",
                n + 1
            )
        })?;
        if key.len() < 16 {
            return Err(format!(
                "{setting}: secret #{} is too short ({} bytes; use at least 24 random bytes)",
                n + 1,
                key.len()
            ));
        }
        keys.push(key);
    }
    if keys.len() > 2 {
        return Err(format!(
            "{setting}: at most two secrets (the new and the old one, during a rotation)"
        ));
    }
    Ok(Keys(keys))
}

impl Keys {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The header value: one `v1,<signature>` per key, space-separated.
    pub fn signature(&self, id: &str, timestamp: u64, body: &str) -> String {
        self.0
            .iter()
            .map(|key| {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body.as_bytes());
                format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks reference libraries' test vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn matches_the_published_test_vector() {
        let keys = parse(SECRET, "s").unwrap();
        assert_eq!(
            keys.signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                r#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn two_secrets_give_two_signatures() {
        let other = format!("whsec_{}", STANDARD.encode([7u8; 32]));
        let keys = parse(&format!("{SECRET}  {other}"), "s").unwrap();
        let sig = keys.signature(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(parts[1].starts_with("v1,") && parts[1] != parts[0]);
    }

    #[test]
    fn empty_means_unsigned() {
        assert!(parse("  ", "s").unwrap().is_empty());
    }

    #[test]
    fn malformed_secrets_are_explained_without_revealing_them() {
        for (bad, why) in [
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "does not start with whsec_",
            ),
            ("whsec_not*base64!", "not valid base64"),
            ("whsec_c2hvcnQ=", "too short"),
        ] {
            let err = parse(bad, "signing_secret").unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(err.starts_with("signing_secret"), "{err}");
            // Messages naming the full setting would be cut by the log redaction.
            assert_eq!(crate::model::redact::redact(&err), None, "{err}");
            assert!(!err.contains(bad) && !err.contains("MfKQ9r8G"), "{err}");
        }
        let three = format!("{SECRET} {SECRET} {SECRET}");
        assert!(parse(&three, "s").unwrap_err().contains("at most two"));
    }

    #[test]
    fn debug_output_hides_keys() {
        let keys = parse(SECRET, "s").unwrap();
        assert_eq!(format!("{keys:?}"), "Keys(1 hidden)");
    }
}
