//! What a Mount request says: the driver's attributes (a JSON object of strings, holding the
//! SecretProviderClass parameters, the pod's identity and its ServiceAccount tokens), the
//! `objects` list (YAML in a string), file names and modes. Everything here is untrusted input
//! and is checked before any call to Keyward.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// Largest `attributes` or `secrets` string accepted (bytes).
pub const MAX_ATTRIBUTES: usize = 256 * 1024;
/// Largest `objects` YAML accepted (bytes).
pub const MAX_OBJECTS_YAML: usize = 64 * 1024;
/// Most objects in one SecretProviderClass.
pub const MAX_OBJECTS: usize = 100;
/// The attribute holding the pod's ServiceAccount tokens (a JSON string inside the JSON).
pub const TOKENS_KEY: &str = "csi.storage.k8s.io/serviceAccount.tokens";

/// A refused request: a stable code (also the driver's metric label) and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Invalid {
    /// Stable code, e.g. `InvalidParameters`.
    pub code: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn invalid(code: &'static str, message: impl Into<String>) -> Invalid {
    Invalid { code, message: message.into() }
}

/// One object of the SecretProviderClass `objects` parameter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectSpec {
    /// A Keyward secret path (`payments/db`).
    #[serde(default)]
    pub path: Option<String>,
    /// Only this field of the secret (the file then holds its value); without it the file holds
    /// the secret's fields as a JSON object.
    #[serde(default)]
    pub field: Option<String>,
    /// A fixed version (default: the latest, so rotation picks up new versions).
    #[serde(default)]
    pub version: Option<u32>,
    /// Instead of a secret: a data key wrapped under a Keyward key (base64 of the ciphertext
    /// from generate-data-key); the file holds the unwrapped key.
    #[serde(default)]
    pub ciphertext: Option<String>,
    /// The encryption context the data key was wrapped with.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// File name in the volume (relative; may contain `/`).
    pub file_name: String,
    /// File mode, always read as octal (`0400` or `"0400"`); default: the volume's permission.
    #[serde(default)]
    pub mode: Option<String>,
}

/// What an object fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A secret (optionally one field, optionally one version).
    Secret {
        /// Path.
        path: String,
        /// Field.
        field: Option<String>,
        /// Version.
        version: Option<u32>,
    },
    /// A wrapped data key to unwrap.
    DataKey {
        /// The ciphertext.
        ciphertext: Vec<u8>,
        /// Its encryption context.
        context: BTreeMap<String, String>,
    },
}

/// A checked object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// What to fetch.
    pub source: Source,
    /// Where to write it.
    pub file_name: String,
    /// Its mode (0..=0o777).
    pub mode: u32,
}

impl Object {
    /// The id reported in `object_version`.
    pub fn id(&self) -> String {
        match &self.source {
            Source::Secret { path, field: Some(f), .. } => format!("secret/{path}#{f}"),
            Source::Secret { path, field: None, .. } => format!("secret/{path}"),
            Source::DataKey { .. } => format!("data-key/{}", self.file_name),
        }
    }
}

/// The pod a Mount is for, as the kubelet told the driver.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// ServiceAccount name.
    pub service_account: String,
}

/// A checked Mount request.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Keyward address (the provider's, or an allowed one named by `keywardAddress`).
    pub address: Option<String>,
    /// Kubernetes auth role to log in with.
    pub role: String,
    /// Audience of the ServiceAccount token to present.
    pub audience: Option<String>,
    /// The pod.
    pub pod: Pod,
    /// The pod's ServiceAccount token for that audience (wiped on drop).
    pub token: zeroize::Zeroizing<String>,
    /// The SecretProviderClass name, for audit records.
    pub class: String,
    /// The objects, in order.
    pub objects: Vec<Object>,
}

/// Parse the `attributes` (and `secrets`) JSON strings.
pub fn parse_json_map(what: &'static str, s: &str) -> Result<BTreeMap<String, String>, Invalid> {
    if s.len() > MAX_ATTRIBUTES {
        return Err(invalid("InvalidRequest", format!("{what} is {} bytes; the limit is {MAX_ATTRIBUTES}", s.len())));
    }
    if s.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_str(s)
        .map_err(|_| invalid("InvalidRequest", format!("{what} is not a JSON object of string values")))
}

/// Parse the volume's `permission` (the JSON of a Go file mode: decimal text such as `"420"`).
pub fn parse_permission(s: &str) -> Result<u32, Invalid> {
    if s.is_empty() {
        return Ok(0o644);
    }
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| invalid("InvalidRequest", format!("permission {s:?} is not a decimal file mode of at most 511")))
}

/// Check a file name as the driver will: relative, clean, no `..` element, at most 4096 bytes,
/// each element at most 255.
pub fn check_file_name(name: &str) -> Result<(), Invalid> {
    let bad = |why: &str| Err(invalid("InvalidFileName", format!("fileName {name:?} {why}")));
    if name.is_empty() || name.len() > 4096 {
        return bad("must be 1 to 4096 bytes");
    }
    if name.starts_with('/') {
        return bad("must be relative");
    }
    if name.contains('\0') || name.contains('\\') {
        return bad("must not contain NUL or backslash");
    }
    for el in name.split('/') {
        match el {
            "" | "." => return bad("must be in clean form (no empty or '.' elements, no trailing '/')"),
            ".." => return bad("must not contain '..'"),
            _ if el.len() > 255 => return bad("has an element longer than 255 bytes"),
            // The driver's atomic writer keeps its own data under names starting with "..".
            _ if el.starts_with("..") => return bad("must not have an element starting with '..'"),
            _ => {}
        }
    }
    Ok(())
}

fn parse_mode(s: &str) -> Result<u32, Invalid> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777 && !digits.is_empty())
        .ok_or_else(|| invalid("InvalidParameters", format!("mode {s:?} is not an octal file mode such as \"0400\"")))
}

/// Parse and check the `objects` YAML.
pub fn parse_objects(yaml: &str, default_mode: u32) -> Result<Vec<Object>, Invalid> {
    if yaml.len() > MAX_OBJECTS_YAML {
        return Err(invalid("InvalidParameters", format!("objects is over {MAX_OBJECTS_YAML} bytes")));
    }
    let specs: Vec<ObjectSpec> = serde_saphyr::from_str(yaml).map_err(|e| {
        let msg = e.to_string();
        invalid(
            "InvalidParameters",
            format!(
                "objects is not a YAML list of {{path, field, version, fileName, mode}} or {{ciphertext, context, fileName, mode}}: {}",
                msg.chars().take(200).collect::<String>()
            ),
        )
    })?;
    if specs.is_empty() || specs.len() > MAX_OBJECTS {
        return Err(invalid("InvalidParameters", format!("objects must list 1 to {MAX_OBJECTS} objects")));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        check_file_name(&s.file_name)?;
        if !seen.insert(s.file_name.clone()) {
            return Err(invalid("InvalidParameters", format!("fileName {:?} is used twice", s.file_name)));
        }
        let mode = match &s.mode {
            Some(m) => parse_mode(m)?,
            None => default_mode,
        };
        let source = match (s.path, s.ciphertext) {
            (Some(path), None) => {
                if path.is_empty() || path.len() > 512 {
                    return Err(invalid("InvalidParameters", "a secret path is 1 to 512 bytes"));
                }
                if !s.context.is_empty() {
                    return Err(invalid("InvalidParameters", "context applies only to ciphertext objects"));
                }
                Source::Secret { path, field: s.field, version: s.version }
            }
            (None, Some(ct)) => {
                if s.field.is_some() || s.version.is_some() {
                    return Err(invalid("InvalidParameters", "field and version apply only to secret objects"));
                }
                use base64::Engine;
                let ciphertext = base64::engine::general_purpose::STANDARD
                    .decode(ct.trim())
                    .map_err(|_| invalid("InvalidParameters", "ciphertext is not valid base64"))?;
                Source::DataKey { ciphertext, context: s.context }
            }
            _ => {
                return Err(invalid(
                    "InvalidParameters",
                    format!("object {:?} needs exactly one of path or ciphertext", s.file_name),
                ));
            }
        };
        out.push(Object { source, file_name: s.file_name, mode });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct TokenEntry {
    token: String,
}

/// Pick the pod's ServiceAccount token for `audience` from the tokens attribute (a JSON string
/// of `{"<audience>": {"token": "...", "expirationTimestamp": "..."}}`).
pub fn pod_token(tokens_json: &str, audience: &str) -> Result<zeroize::Zeroizing<String>, Invalid> {
    let no_token = || {
        invalid(
            "MissingToken",
            format!(
                "no ServiceAccount token for audience {audience:?}: add it to the CSIDriver's tokenRequests \
                 (secrets-store.csi.k8s.io) so the driver passes it"
            ),
        )
    };
    if tokens_json.trim().is_empty() {
        return Err(no_token());
    }
    let mut map: BTreeMap<String, TokenEntry> = serde_json::from_str(tokens_json)
        .map_err(|_| invalid("InvalidRequest", format!("{TOKENS_KEY} is not a JSON object of tokens")))?;
    let t = map.remove(audience).ok_or_else(no_token)?;
    for (_, mut other) in map {
        zeroize::Zeroize::zeroize(&mut other.token);
    }
    Ok(zeroize::Zeroizing::new(t.token))
}

/// Check a whole Mount request. `default_audience` is the provider's `--audience`.
///
/// The pod's token is taken from where the driver puts the tokens the CSIDriver's
/// `tokenRequests` asked the kubelet for: the `csi.storage.k8s.io/serviceAccount.tokens`
/// attribute (the driver copies it there also when the kubelet delivers it in `secrets`).
/// `secrets` also holds the data of the volume's `nodePublishSecretRef`, which the pod's author
/// chooses, so a token is read from it only with `allow_secret_tokens` (weaker: see
/// `docs/kubernetes/csi.md`).
pub fn parse_mount(
    attributes: &str,
    secrets: &str,
    permission: &str,
    default_audience: &str,
    allow_secret_tokens: bool,
) -> Result<MountSpec, Invalid> {
    let attrs = parse_json_map("attributes", attributes)?;
    let secrets = parse_json_map("secrets", secrets)?;
    let get = |k: &str| attrs.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let need = |k: &str| {
        get(k).map(str::to_string).ok_or_else(|| {
            invalid("MissingPodInfo", format!("attribute {k:?} is missing: the CSIDriver needs podInfoOnMount: true"))
        })
    };
    let pod = Pod {
        namespace: need("csi.storage.k8s.io/pod.namespace")?,
        name: need("csi.storage.k8s.io/pod.name")?,
        uid: need("csi.storage.k8s.io/pod.uid")?,
        service_account: need("csi.storage.k8s.io/serviceAccount.name")?,
    };
    let role = get("role")
        .ok_or_else(|| invalid("InvalidParameters", "parameter \"role\" (a Keyward Kubernetes auth role) is required"))?
        .to_string();
    let yaml = get("objects").ok_or_else(|| invalid("InvalidParameters", "parameter \"objects\" is required"))?;
    let objects = parse_objects(yaml, parse_permission(permission)?)?;
    let audience = get("audience").map(str::to_string);
    let from_secrets = if allow_secret_tokens { secrets.get(TOKENS_KEY) } else { None };
    let tokens = attrs.get(TOKENS_KEY).or(from_secrets).map(String::as_str).unwrap_or("");
    let token = pod_token(tokens, audience.as_deref().unwrap_or(default_audience))?;
    Ok(MountSpec {
        address: get("keywardAddress").map(str::to_string),
        role,
        audience,
        pod,
        token,
        class: get("secretProviderClass").unwrap_or("-").to_string(),
        objects,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn file_names() {
        for ok in ["a", "db/password", "a.b", "x..y", "a/b/c"] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "/abs", "../x", "a/../b", "..", "a/", "./a", "a//b", "..data", "a/..2024", "a\\b", &"x".repeat(256)]
        {
            assert_eq!(check_file_name(bad).unwrap_err().code, "InvalidFileName", "{bad}");
        }
    }

    #[test]
    fn objects_yaml() {
        let y = "- path: payments/db\n  field: password\n  fileName: db-password\n  mode: \"0400\"\n\
                 - path: payments/api\n  version: 3\n  fileName: api.json\n\
                 - ciphertext: S1cB\n  context: {tenant: a}\n  fileName: keys/dek\n";
        let o = parse_objects(y, 0o644).unwrap();
        assert_eq!(o.len(), 3);
        assert_eq!(o[0].mode, 0o400);
        assert_eq!(o[0].id(), "secret/payments/db#password");
        assert_eq!(o[1].mode, 0o644);
        // Unquoted modes are read as octal text too.
        assert_eq!(parse_objects("- path: a\n  fileName: x\n  mode: 0440\n", 0o644).unwrap()[0].mode, 0o440);
        assert!(matches!(&o[1].source, Source::Secret { version: Some(3), field: None, .. }));
        assert!(matches!(&o[2].source, Source::DataKey { context, .. } if context["tenant"] == "a"));
        for (bad, code) in [
            ("- path: a\n  fileName: x\n  mode: 0800\n", "InvalidParameters"),
            ("- path: a\n  fileName: x\n  mode: \"999\"\n", "InvalidParameters"),
            ("- path: a\n  fileName: ../x\n", "InvalidFileName"),
            ("- path: a\n  fileName: x\n- path: b\n  fileName: x\n", "InvalidParameters"),
            ("- fileName: x\n", "InvalidParameters"),
            ("- path: a\n  ciphertext: AA==\n  fileName: x\n", "InvalidParameters"),
            ("- path: a\n  fileName: x\n  colour: red\n", "InvalidParameters"),
            ("[]", "InvalidParameters"),
            ("not: a list", "InvalidParameters"),
            ("- ciphertext: '%%%'\n  fileName: x\n", "InvalidParameters"),
        ] {
            assert_eq!(parse_objects(bad, 0o644).unwrap_err().code, code, "{bad}");
        }
    }

    fn attrs(extra: &[(&str, &str)]) -> String {
        let tokens = serde_json::json!({"keyward": {"token": "jwt-1", "expirationTimestamp": "2030-01-01T00:00:00Z"},
                                        "": {"token": "api-jwt", "expirationTimestamp": "2030-01-01T00:00:00Z"}});
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("csi.storage.k8s.io/pod.namespace", "payments"),
            ("csi.storage.k8s.io/pod.name", "api-0"),
            ("csi.storage.k8s.io/pod.uid", "0b1e"),
            ("csi.storage.k8s.io/serviceAccount.name", "api"),
            ("secretProviderClass", "payments-secrets"),
            ("role", "payments"),
            ("objects", "- path: payments/db\n  fileName: db\n"),
        ] {
            m.insert(k.into(), v.into());
        }
        m.insert(TOKENS_KEY.into(), tokens.to_string().into());
        for (k, v) in extra {
            m.insert((*k).into(), (*v).into());
        }
        serde_json::Value::Object(m).to_string()
    }

    #[test]
    fn mount_requests_as_the_driver_sends_them() {
        let m = parse_mount(&attrs(&[]), "{}", "420", "keyward", false).unwrap();
        assert_eq!(m.pod.namespace, "payments");
        assert_eq!(m.token.as_str(), "jwt-1");
        assert_eq!(m.objects[0].mode, 0o644, "420 decimal is 0644");
        // A token in `secrets` (the nodePublishSecretRef's data, chosen by the pod's author) is
        // never taken over the driver's attribute, and alone only when the provider allows it.
        let secrets = serde_json::json!({TOKENS_KEY: serde_json::json!({"keyward": {"token": "jwt-2"}}).to_string()});
        let s = secrets.to_string();
        assert_eq!(parse_mount(&attrs(&[]), &s, "420", "keyward", true).unwrap().token.as_str(), "jwt-1");
        let mut without: BTreeMap<String, String> = serde_json::from_str(&attrs(&[])).unwrap();
        without.remove(TOKENS_KEY);
        let without = serde_json::to_string(&without).unwrap();
        assert_eq!(parse_mount(&without, &s, "420", "keyward", false).unwrap_err().code, "MissingToken");
        assert_eq!(parse_mount(&without, &s, "420", "keyward", true).unwrap().token.as_str(), "jwt-2");
        assert_eq!(parse_mount(&attrs(&[]), "", "420", "other", false).unwrap_err().code, "MissingToken");
        assert_eq!(
            parse_mount(&attrs(&[("role", "")]), "", "420", "keyward", false).unwrap_err().code,
            "InvalidParameters"
        );
        assert_eq!(parse_mount(&attrs(&[]), "", "0644", "keyward", false).unwrap_err().code, "InvalidRequest");
        assert_eq!(parse_mount("[1]", "", "420", "keyward", false).unwrap_err().code, "InvalidRequest");
        assert_eq!(
            parse_mount(&attrs(&[("csi.storage.k8s.io/pod.uid", "")]), "", "420", "keyward", false).unwrap_err().code,
            "MissingPodInfo"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(a in "\\PC{0,300}", y in "\\PC{0,300}", p in "\\PC{0,6}") {
            let _ = parse_mount(&a, "", &p, "keyward", false);
            let _ = parse_objects(&y, 0o644);
            if check_file_name(&a).is_ok() {
                prop_assert!(!a.starts_with('/') && !a.split('/').any(|e| e == ".." || e.is_empty()));
            }
        }
    }
}
