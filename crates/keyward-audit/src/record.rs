//! One audit record, its chain MAC (each record's HMAC covers the previous one's), and the marker
//! that opens every file.

use super::*;

/// The current time as audit records show it (RFC 3339, milliseconds, UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// One audit record, before chaining. Holds no secret values, tokens or plaintext.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 time with milliseconds.
    pub time: String,
    /// Request id (also in the response header `x-request-id`).
    pub request_id: String,
    /// Token accessor, or `anonymous`.
    pub identity: String,
    /// HTTP method.
    pub method: String,
    /// Request path (names keys and secret paths, never values).
    pub path: String,
    /// Operation checked (`encrypt`, `read`, ...), if authorization was reached.
    pub operation: Option<String>,
    /// Resource checked (`keys/NAME`, `secrets/PATH`), if authorization was reached.
    pub resource: Option<String>,
    /// `allow`, `deny`, or `none` (refused before authorization, e.g. bad token).
    pub decision: &'static str,
    /// The grant or the reason for the decision.
    pub reason: Option<String>,
    /// HTTP status of the response.
    pub status: u16,
    /// Error code of the response, if it failed.
    pub error: Option<String>,
    /// The encryption context of a cryptographic operation (not secret, and what says which
    /// object a key was used for, as AWS KMS logs it); absent for other requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<std::collections::BTreeMap<String, String>>,
    /// Where the request came from: the TCP peer (`ip:port`), or the Unix socket peer
    /// (`unix:pid=P,uid=U`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Set on the first record of each file only, by the writer: `begins` (the chain's first
    /// record) or `continues` (a file that carries the chain on after a rotation, or after the
    /// previous file was moved away while the log was open). A log whose first record is not
    /// one of these lost records from its start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<&'static str>,
}

/// The `chain` value of a chain's first record.
pub const CHAIN_BEGINS: &str = "begins";

/// The `chain` value of the first record of a file that continues a chain.
pub const CHAIN_CONTINUES: &str = "continues";

/// The record that opens a file: `begins` the chain, or `continues` it for `why`.
pub(super) fn marker(continues: Option<String>) -> AuditRecord {
    let (chain, reason) = match continues {
        None => (CHAIN_BEGINS, "audit log begins".to_string()),
        Some(why) => (CHAIN_CONTINUES, why),
    };
    AuditRecord {
        time: now_rfc3339(),
        request_id: "-".into(),
        identity: "keyward".into(),
        method: "-".into(),
        path: "-".into(),
        operation: Some("system".into()),
        resource: None,
        decision: "none",
        reason: Some(reason),
        status: 0,
        error: None,
        context: None,
        client: None,
        chain: Some(chain),
    }
}

pub(super) const ZERO_MAC: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub(super) const MAC_SUFFIX_LEN: usize = r#","hmac":""#.len() + 64 + 2;

pub(super) fn chain_line(
    key: &hash::HmacKey,
    record: &AuditRecord,
    seq: u64,
    prev: &str,
    server: Option<&str>,
) -> Result<(Vec<u8>, String), AuditError> {
    let mut body = serde_json::to_vec(record).map_err(|e| AuditError::Unavailable(e.to_string()))?;
    // `{...}` -> `{...[,"server":"ID"],"seq":N,"prev":"HEX"}` (`server` already JSON-encoded)
    body.pop();
    if let Some(id) = server {
        body.extend_from_slice(br#","server":"#);
        body.extend_from_slice(id.as_bytes());
    }
    body.extend_from_slice(format!(r#","seq":{seq},"prev":"{prev}"}}"#).as_bytes());
    let mac = hex::encode(key.sign(&body));
    body.pop();
    body.extend_from_slice(format!(r#","hmac":"{mac}"}}"#).as_bytes());
    body.push(b'\n');
    Ok((body, mac))
}
