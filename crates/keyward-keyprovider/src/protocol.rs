//! The ocicrypt key-provider protocol's JSON documents, with Go's field names (`Parameters`,
//! `DecryptConfig`) and every `[]byte` as standard base64. The same documents travel on stdin and
//! stdout (command providers) and inside the gRPC messages' bytes.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Largest input document accepted (a wrap carries about 200 bytes of options).
pub const MAX_INPUT: usize = 1024 * 1024;

/// What the provider is asked to do.
#[derive(Debug)]
pub enum Request {
    /// Wrap `optsdata` (the private options) with the parameters given for this provider.
    Wrap {
        /// The `--encryption-key provider:NAME:PARAMS` parameters (decoded), if any.
        params: Vec<Vec<u8>>,
        /// The private-options JSON.
        optsdata: Zeroizing<Vec<u8>>,
    },
    /// Unwrap what this provider returned at wrap time.
    Unwrap {
        /// The `--decryption-key provider:NAME:PARAMS` parameters (decoded), if any.
        params: Vec<Vec<u8>>,
        /// The bytes the provider returned at wrap time.
        annotation: Vec<u8>,
    },
}

#[derive(Deserialize)]
struct RawInput {
    op: String,
    #[serde(default)]
    keywrapparams: Option<RawWrapParams>,
    #[serde(default)]
    keyunwrapparams: Option<RawUnwrapParams>,
}

#[derive(Deserialize)]
struct RawWrapParams {
    #[serde(default)]
    ec: Option<RawConfig>,
    #[serde(default)]
    optsdata: Option<Zeroizing<String>>,
}

#[derive(Deserialize)]
struct RawUnwrapParams {
    #[serde(default)]
    dc: Option<RawConfig>,
    #[serde(default)]
    annotation: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "Parameters", default)]
    parameters: Option<BTreeMap<String, Option<Vec<String>>>>,
}

/// Why an input document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn bad(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// Parse an input document for the provider called `name`.
pub fn parse_request(input: &[u8], name: &str) -> Result<Request, ProtocolError> {
    if input.len() > MAX_INPUT {
        return Err(bad("key-provider input larger than 1 MiB"));
    }
    let raw: RawInput = serde_json::from_slice(input)
        .map_err(|e| bad(format!("key-provider input is not the protocol's JSON: {e}")))?;
    let params = |c: Option<RawConfig>| -> Result<Vec<Vec<u8>>, ProtocolError> {
        let list = c.and_then(|c| c.parameters).and_then(|mut p| p.remove(name)).flatten().unwrap_or_default();
        list.iter()
            .map(|p| STANDARD.decode(p).map_err(|_| bad(format!("parameter for {name} is not base64"))))
            .collect()
    };
    match raw.op.as_str() {
        "keywrap" => {
            let w = raw.keywrapparams.ok_or_else(|| bad("keywrap without keywrapparams"))?;
            let optsdata = w.optsdata.ok_or_else(|| bad("keywrap without keywrapparams.optsdata"))?;
            let optsdata = Zeroizing::new(
                STANDARD.decode(optsdata.as_bytes()).map_err(|_| bad("keywrapparams.optsdata is not base64"))?,
            );
            Ok(Request::Wrap { params: params(w.ec)?, optsdata })
        }
        "keyunwrap" => {
            let u = raw.keyunwrapparams.ok_or_else(|| bad("keyunwrap without keyunwrapparams"))?;
            let annotation = u.annotation.ok_or_else(|| bad("keyunwrap without keyunwrapparams.annotation"))?;
            let annotation =
                STANDARD.decode(annotation).map_err(|_| bad("keyunwrapparams.annotation is not base64"))?;
            Ok(Request::Unwrap { params: params(u.dc)?, annotation })
        }
        other => Err(bad(format!("unknown op {other:?}: expected keywrap or keyunwrap"))),
    }
}

#[derive(Serialize)]
struct WrapOut<'a> {
    keywrapresults: WrapResults<'a>,
}

#[derive(Serialize)]
struct WrapResults<'a> {
    annotation: &'a str,
}

#[derive(Serialize)]
struct UnwrapOut<'a> {
    keyunwrapresults: UnwrapResults<'a>,
}

#[derive(Serialize)]
struct UnwrapResults<'a> {
    optsdata: &'a str,
}

/// `{"keywrapresults":{"annotation":"<b64>"}}`.
pub fn wrap_output(annotation: &[u8]) -> Vec<u8> {
    let b64 = STANDARD.encode(annotation);
    serde_json::to_vec(&WrapOut { keywrapresults: WrapResults { annotation: &b64 } }).unwrap_or_default()
}

/// `{"keyunwrapresults":{"optsdata":"<b64>"}}`, in a wiping buffer.
pub fn unwrap_output(optsdata: &[u8]) -> Zeroizing<Vec<u8>> {
    let b64 = Zeroizing::new(STANDARD.encode(optsdata));
    Zeroizing::new(
        serde_json::to_vec(&UnwrapOut { keyunwrapresults: UnwrapResults { optsdata: &b64 } }).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Documents as skopeo (Go ocicrypt) sends them.
    #[test]
    fn go_ocicrypt_documents() {
        let wrap = br#"{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"keyward":["aW1hZ2VzOjpmb28="],"other":["eA=="]},"DecryptConfig":{"Parameters":{}}},"optsdata":"e30="},"keyunwrapparams":{"dc":null,"annotation":null}}"#;
        match parse_request(wrap, "keyward").unwrap() {
            Request::Wrap { params, optsdata } => {
                assert_eq!(params, vec![b"images::foo".to_vec()]);
                assert_eq!(optsdata.as_slice(), b"{}");
            }
            other => panic!("{other:?}"),
        }
        let unwrap = br#"{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":{"keyward":null,"x":[]}},"annotation":"YWJj"}}"#;
        match parse_request(unwrap, "keyward").unwrap() {
            Request::Unwrap { params, annotation } => {
                assert!(params.is_empty());
                assert_eq!(annotation, b"abc");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(wrap_output(b"abc"), br#"{"keywrapresults":{"annotation":"YWJj"}}"#.to_vec());
        assert_eq!(unwrap_output(b"{}").as_slice(), br#"{"keyunwrapresults":{"optsdata":"e30="}}"#);
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        for (doc, expected) in [
            (&br#"{"op":"keywrap"}"#[..], "without keywrapparams"),
            (br#"{"op":"keywrap","keywrapparams":{"optsdata":"!!"}}"#, "not base64"),
            (br#"{"op":"keyunwrap","keyunwrapparams":{"annotation":null}}"#, "without keyunwrapparams.annotation"),
            (br#"{"op":"rot13"}"#, "unknown op"),
            (b"[]", "not the protocol's JSON"),
        ] {
            let e = parse_request(doc, "keyward").unwrap_err();
            assert!(e.0.contains(expected), "{e}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let _ = parse_request(&bytes, "keyward");
            }

            #[test]
            fn json_shapes_never_panic(op in "keywrap|keyunwrap|x", a in "[A-Za-z0-9+/=]{0,12}", p in "[A-Za-z0-9+/=!]{0,12}") {
                let doc = format!(r#"{{"op":"{op}","keywrapparams":{{"ec":{{"Parameters":{{"keyward":["{p}"]}}}},"optsdata":"{a}"}},"keyunwrapparams":{{"dc":{{"Parameters":{{"keyward":["{p}"]}}}},"annotation":"{a}"}}}}"#);
                let _ = parse_request(doc.as_bytes(), "keyward");
            }
        }
    }
}
