//! Request extractors: strict JSON bodies and query strings with our error format, the request
//! id, and the authenticated caller.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use keyward_core::model::TokenRecord;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest accepted request body (64 KiB of plaintext is ~88 KiB of base64, plus context).
pub const MAX_BODY: usize = 256 * 1024;

/// A JSON body parsed strictly: size-limited, unknown fields rejected (each request type has
/// `deny_unknown_fields`), and errors that never echo submitted values.
#[derive(Debug)]
pub struct StrictJson<T>(pub T);

pub(crate) fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let msg = e.to_string();
    let detail = match e.classify() {
        Category::Data if msg.starts_with("unknown field") || msg.starts_with("missing field") => {
            // Field names only, never values.
            msg.split(" at line").next().unwrap_or("invalid field").to_string()
        }
        Category::Data => {
            format!("a field has the wrong type or an invalid value (line {}, column {})", e.line(), e.column())
        }
        Category::Eof => "the JSON body is truncated".to_string(),
        Category::Syntax => format!("the body is not valid JSON (line {}, column {})", e.line(), e.column()),
        Category::Io => "the body could not be read".to_string(),
    };
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("invalid request body: {detail}"))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
            let ok =
                ct.to_str().map(|s| s.split(';').next().unwrap_or("").trim() == "application/json").unwrap_or(false);
            if !ok {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the request body as application/json",
                ));
            }
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY).await.map_err(|_| body_too_large())?;
        let body: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        parse_json(body).map(StrictJson)
    }
}

/// 413: a request body over [`MAX_BODY`].
pub(crate) fn body_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body is larger than {MAX_BODY} bytes"),
    )
}

/// JSON's whitespace (RFC 8259: space, tab, line feed, carriage return), narrower than ASCII's.
pub(crate) fn is_json_whitespace(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Parse a JSON request body strictly, with errors in our format. JSON Schema's integers
/// include `3.0`: a body with a whole number written as a float is read again with those
/// numbers as integers.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every request body is an object (serde would also read a struct from an array).
    if body.iter().find(|b| !is_json_whitespace(b)) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "invalid request body: it must be a JSON object ({...})",
        ));
    }
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            let mut v: serde_json::Value = serde_json::from_slice(body).map_err(|_| json_error(&e))?;
            if !integral_floats_to_integers(&mut v) {
                return Err(json_error(&e));
            }
            T::deserialize(v).map_err(|_| json_error(&e))
        }
        Err(e) => Err(json_error(&e)),
    }
}

/// Replace every float with no fractional part (and within 64 bits) by that integer; whether
/// anything was replaced.
fn integral_floats_to_integers(v: &mut serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Below 2^53 every integer is exact in a float.
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                #[allow(clippy::cast_possible_truncation)]
                let i = f as i64;
                *v = serde_json::Value::from(i);
                return true;
            }
            false
        }
        // Every element is visited (no short circuit): each may need replacing.
        serde_json::Value::Array(a) => {
            let mut changed = false;
            for x in a.iter_mut() {
                changed |= integral_floats_to_integers(x);
            }
            changed
        }
        serde_json::Value::Object(o) => {
            let mut changed = false;
            for x in o.values_mut() {
                changed |= integral_floats_to_integers(x);
            }
            changed
        }
        _ => false,
    }
}

/// A query string parsed strictly (unknown parameters rejected).
#[derive(Debug)]
pub struct StrictQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        if q.len() > 4096 {
            return Err(ApiError::invalid("query string longer than 4096 bytes"));
        }
        serde_urlencoded::from_str(q).map(StrictQuery).map_err(|e| {
            let m = e.to_string();
            let detail =
                if m.starts_with("unknown field") { m } else { "a query parameter has an invalid value".into() };
            ApiError::invalid(format!("invalid query string: {detail}"))
        })
    }
}

/// The request id assigned by the request-id middleware.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The authenticated caller, set by the authentication middleware, with the request's audit
/// facts (authorization decisions are recorded there).
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<TokenRecord>, pub Arc<crate::audit::AuditCtx>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::from(keyward_core::KmsError::Unauthenticated(keyward_core::AuthFailure::Missing)))
    }
}

/// A key named in the path, by name or by alias (`alias/NAME`, percent-encoded as
/// `alias%2FNAME`): the key's name. An alias that names nothing is kept as it is, so the
/// handler authorizes it like any key and the service then answers "alias not found" (no
/// answer about aliases before authorization).
#[derive(Debug)]
pub struct KeyName(pub String);

impl FromRequestParts<crate::api::AppState> for KeyName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &crate::api::AppState) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(name) = axum::extract::Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|e| ApiError::invalid(format!("bad key name in the path: {e}")))?;
        resolve_key_name(st, &name).await.map(Self)
    }
}

/// A key name as given, or the key an alias names now (an unknown alias stays as given, so
/// the handler authorizes it like any key and the service then answers "alias not found").
pub(crate) async fn resolve_key_name(st: &crate::api::AppState, name: &str) -> Result<String, ApiError> {
    if !name.starts_with(keyward_core::service::ALIAS_PREFIX) {
        return Ok(name.to_string());
    }
    match st.kms()?.resolve_key_name(name).await {
        Ok(key) => Ok(key),
        Err(keyward_core::KmsError::NotFound { .. }) => Ok(name.to_string()),
        Err(e) => Err(e.into()),
    }
}
