//! JSON wire types of the /v1 API. Every request type rejects unknown fields.

// Request types carry plaintexts and secret values: they deliberately have no Debug.
#![allow(missing_debug_implementations)]

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_core::model::KeyRecord;
use keyward_core::service::{KeyDescription, SecretVersionInfo};

use crate::error::ApiError;

pub use keyward_api::*;

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn unb64(field: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    STANDARD.decode(s).map_err(|_| ApiError::invalid(format!("{field} must be standard base64")))
}

pub fn time(t: i64) -> String {
    let st = UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    humantime::format_rfc3339_seconds(st).to_string()
}

/// A period: a whole number and one unit, `s`, `m`, `h` or `d` (`90d`, `12h`, `30m`, `45s`),
/// with no sign, space or leading zero: the grammar the OpenAPI document's patterns state.
pub fn parse_period(field: &str, s: &str) -> Result<u64, ApiError> {
    let bad = || ApiError::invalid(format!("{field} must be a duration such as 90d, 12h, 30m or 45s"));
    let (digits, unit) = s.split_at_checked(s.len().saturating_sub(1)).ok_or_else(bad)?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(bad());
    }
    digits.parse::<u64>().ok().and_then(|n| n.checked_mul(per)).ok_or_else(bad)
}

pub fn format_period(secs: u64) -> String {
    if secs.is_multiple_of(86400) {
        format!("{}d", secs / 86400)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// A key's metadata as the API answers it.
pub fn key_out(r: &KeyRecord) -> Key {
    Key {
        id: r.id.to_hex(),
        name: r.name.clone(),
        key_type: r.algorithm.as_str().to_string(),
        state: r.state.as_str().to_string(),
        description: r.description.clone(),
        created_at: time(r.created_at),
        updated_at: time(r.updated_at),
        current_version: r.current_version,
        rotate_every: r.rotate_every_secs.map(format_period),
        next_rotation_at: r.next_rotation_at.map(time),
        deletion_at: r.deletion_at.map(time),
        versions: None,
    }
}

/// A key described: its metadata and every version.
pub fn key_described(d: &KeyDescription) -> Key {
    let mut k = key_out(&d.record);
    k.versions = Some(
        d.versions
            .iter()
            .map(|v| KeyVersion {
                version: v.version,
                created_at: time(v.created_at),
                public_key: v.public_key.as_deref().map(b64),
            })
            .collect(),
    );
    k
}

pub fn secret_version_out(v: &SecretVersionInfo) -> SecretVersion {
    SecretVersion {
        version: v.version,
        created_at: time(v.created_at),
        deleted_at: v.deleted_at.map(time),
        destroyed: v.destroyed,
    }
}

/// A stored policy as the API answers it.
pub fn policy_out(p: &keyward_core::policy::Policy) -> Policy {
    Policy {
        name: p.name.clone(),
        description: p.description.clone(),
        identities: p.identities.clone(),
        rules: p
            .rules
            .iter()
            .map(|r| PolicyRule {
                resources: r.resources.clone(),
                operations: r.operations.clone(),
                require: r.require.clone(),
                max_instances: r.max_instances,
                instance_hold_secs: r.instance_hold_secs,
            })
            .collect(),
    }
}

/// The policy a `PUT /v1/policies/{name}` describes.
pub fn policy_in(name: &str, r: PolicyReq) -> keyward_core::policy::Policy {
    keyward_core::policy::Policy {
        name: name.to_string(),
        description: r.description,
        identities: r.identities,
        rules: r
            .rules
            .into_iter()
            .map(|r| keyward_core::policy::Rule {
                resources: r.resources,
                operations: r.operations,
                require: r.require,
                max_instances: r.max_instances,
                instance_hold_secs: r.instance_hold_secs,
            })
            .collect(),
    }
}

/// A base64 string of secret bytes, wiped on drop.
pub fn secret_b64(bytes: &[u8]) -> SecretString {
    zeroize::Zeroizing::new(b64(bytes))
}

/// Bytes the server made as text (a token, a share), as a wiped string.
pub fn secret_text(bytes: &[u8]) -> SecretString {
    zeroize::Zeroizing::new(String::from_utf8_lossy(bytes).into_owned())
}

/// Parse `data` as every request body type (for fuzzing and property tests). Returns how many
/// types accepted it. Never panics.
pub fn parse_all_request_types(data: &[u8]) -> usize {
    fn ok<T: serde::de::DeserializeOwned>(d: &[u8]) -> usize {
        usize::from(serde_json::from_slice::<T>(d).is_ok())
    }
    ok::<CreateKeyReq>(data)
        + ok::<RotationPolicyReq>(data)
        + ok::<ScheduleDeletionReq>(data)
        + ok::<Empty>(data)
        + ok::<EncryptReq>(data)
        + ok::<DecryptReq>(data)
        + ok::<ReencryptReq>(data)
        + ok::<DataKeyReq>(data)
        + ok::<MessageReq>(data)
        + ok::<VerifyReq>(data)
        + ok::<SignReq>(data)
        + ok::<VerifyMacReq>(data)
        + ok::<RandomReq>(data)
        + ok::<PutSecretReq>(data)
        + ok::<RandomizedReq>(data)
        + usize::from(
            serde_json::from_slice::<keyward_core::random::RandomSpec>(data).is_ok_and(|s| s.validate().is_ok()),
        )
        + ok::<VersionsReq>(data)
        + ok::<TokenCreateReq>(data)
        + ok::<AccessorReq>(data)
        + ok::<PolicyReq>(data)
        + ok::<DryRunReq>(data)
        + ok::<InitReq>(data)
        + ok::<ShareReq>(data)
        + ok::<RekeyShareReq>(data)
        + ok::<K8sConfigReq>(data)
        + ok::<K8sRoleReq>(data)
        + ok::<K8sLoginReq>(data)
        + crate::agent_api::parse_agent_requests(data)
        + usize::from(serde_urlencoded::from_bytes::<PageQuery>(data).is_ok())
        + usize::from(serde_urlencoded::from_bytes::<SecretListQuery>(data).is_ok())
        + usize::from(serde_urlencoded::from_bytes::<VersionQuery>(data).is_ok())
        + usize::from(serde_urlencoded::from_bytes::<HealthQuery>(data).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_all_request_types(&bytes);
        }

        #[test]
        fn json_shaped_inputs_never_panic(s in r#"\{("[a-z_]{0,12}":(-?[0-9]{0,20}|"[ -~]{0,20}"|null|true|\[\]|\{\}),?){0,6}\}"#) {
            let _ = parse_all_request_types(s.as_bytes());
        }
    }

    #[test]
    fn strictness() {
        assert_eq!(parse_all_request_types(br#"{"plaintext":"","context":{"a":"b"}}"#), 1, "only EncryptReq");
        assert_eq!(parse_all_request_types(br#"{"plaintext":"","unknown":1}"#), 0, "unknown fields rejected");
        assert!(serde_json::from_slice::<RandomReq>(br#"{"bytes":-1}"#).is_err());
        assert!(serde_json::from_slice::<RandomReq>(br#"{"bytes":1} trailing"#).is_err());
    }

    #[test]
    fn periods() {
        assert_eq!(parse_period("x", "90d").unwrap(), 90 * 86400);
        assert_eq!(format_period(90 * 86400), "90d");
        assert_eq!(format_period(7200), "2h");
        assert_eq!(format_period(61), "61s");
        assert!(parse_period("x", "soon").is_err());
        assert_eq!(parse_period("x", "0s").unwrap(), 0);
        assert_eq!(parse_period("x", "45s").unwrap(), 45);
        for bad in ["", "s", "1", "01m", "1.5h", "-1s", "1 h", "1h30m", "1w", "99999999999999d", "é"] {
            assert!(parse_period("x", bad).is_err(), "{bad}");
        }
    }
}
