//! Request bodies, read by serde-derived types that refuse unknown and repeated fields.
//!
//! Each field is first taken as it was sent ([`Sent`]) and then checked in plain code, so that a
//! wrong value gets its field's own error code (`invalid_name`, …) rather than serde's generic one.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ApiError, BODY_LIMIT};
use crate::{
    Credits, KeyName, KeyUpdate, Meta, NewKey, OwnerId, OwnerUpdate, RateLimit, RateLimits, Refill, RefillInterval,
    Scopes, ValidationError,
};

/// `POST /account/api-keys`: every field optional or null.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct CreateRequest {
    #[serde(default)]
    name: Option<Sent<String>>,
    #[serde(default)]
    expires_at: Option<Sent<String>>,
    #[serde(default)]
    scopes: Option<Sent<Vec<String>>>,
    #[serde(default)]
    owner_id: Option<Sent<String>>,
    #[serde(default)]
    meta: Option<Sent<serde_json::Map<String, serde_json::Value>>>,
    #[serde(default)]
    credits: Option<Sent<CreditsBody>>,
    #[serde(default)]
    ratelimits: Option<Sent<Vec<RateLimitBody>>>,
}

impl CreateRequest {
    pub(super) fn into_new_key(self) -> Result<NewKey, ApiError> {
        let mut new = NewKey::default();
        new.name = self.name.map(|name| KeyName::new(name.valid().ok_or(ValidationError::Name)?)).transpose()?;
        new.expires_at = self.expires_at.map(|at| parse_timestamp(at.valid().as_deref())).transpose()?;
        new.scopes =
            self.scopes.map(|grants| Scopes::new(grants.valid().ok_or(ValidationError::Scope)?)).transpose()?;
        new.owner =
            self.owner_id.map(|owner| OwnerId::new(owner.valid().ok_or(ValidationError::OwnerId)?)).transpose()?;
        new.meta = self.meta.map(|meta| Meta::from_object(meta.valid().ok_or(ValidationError::Meta)?)).transpose()?;
        new.credits =
            self.credits.map(|credits| credits.valid().ok_or(ValidationError::Credits)?.parse()).transpose()?;
        new.ratelimits = self.ratelimits.map(parse_rate_limits).transpose()?;
        Ok(new)
    }
}

/// `PATCH /account/api-keys/{id}`: each field left out stays as it is; `null` takes it away
/// (`credits: null` is unlimited use).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct UpdateRequest {
    #[serde(default, deserialize_with = "present")]
    name: Option<Option<Sent<String>>>,
    #[serde(default, deserialize_with = "present")]
    meta: Option<Option<Sent<serde_json::Map<String, serde_json::Value>>>>,
    #[serde(default, deserialize_with = "present")]
    credits: Option<Option<Sent<CreditsBody>>>,
    #[serde(default, deserialize_with = "present")]
    ratelimits: Option<Option<Sent<Vec<RateLimitBody>>>>,
}

/// A field that is there, `null` or not: told apart from one left out, which `default` gives.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

impl UpdateRequest {
    pub(super) fn into_update(self) -> Result<KeyUpdate, ApiError> {
        let mut update = KeyUpdate::default();
        if let Some(name) = self.name {
            update =
                update.name(name.map(|name| KeyName::new(name.valid().ok_or(ValidationError::Name)?)).transpose()?);
        }
        if let Some(meta) = self.meta {
            let meta = meta.map(|meta| Meta::from_object(meta.valid().ok_or(ValidationError::Meta)?)).transpose()?;
            update = update.meta(meta);
        }
        let (credits, ratelimits) = parse_limits(self.credits, self.ratelimits)?;
        update.credits = credits;
        update.ratelimits = ratelimits;
        Ok(update)
    }
}

/// `PATCH /account/owners/{ownerId}`: the owner's credits and rate limits, each left as it is
/// when left out, and taken away when `null`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OwnerRequest {
    #[serde(default, deserialize_with = "present")]
    credits: Option<Option<Sent<CreditsBody>>>,
    #[serde(default, deserialize_with = "present")]
    ratelimits: Option<Option<Sent<Vec<RateLimitBody>>>>,
}

impl OwnerRequest {
    pub(super) fn into_update(self) -> Result<OwnerUpdate, ApiError> {
        let mut update = OwnerUpdate::default();
        (update.credits, update.ratelimits) = parse_limits(self.credits, self.ratelimits)?;
        Ok(update)
    }
}

/// The `credits` and `ratelimits` of a change as sent: each `None` when left out, and taken away
/// when `null`.
#[allow(clippy::type_complexity)]
fn parse_limits(
    credits: Option<Option<Sent<CreditsBody>>>,
    ratelimits: Option<Option<Sent<Vec<RateLimitBody>>>>,
) -> Result<(Option<Option<Credits>>, Option<RateLimits>), ValidationError> {
    let credits =
        credits.map(|credits| credits.map(|credits| credits.valid().ok_or(ValidationError::Credits)?.parse()));
    let ratelimits = ratelimits.map(|limits| limits.map(parse_rate_limits).transpose().map(Option::unwrap_or_default));
    Ok((credits.map(Option::transpose).transpose()?, ratelimits.transpose()?))
}

/// `ratelimits` as sent: a list of [`RateLimitBody`].
fn parse_rate_limits(limits: Sent<Vec<RateLimitBody>>) -> Result<RateLimits, ValidationError> {
    let limits = limits.valid().ok_or(ValidationError::RateLimit)?;
    RateLimits::new(limits.into_iter().map(RateLimitBody::parse).collect::<Result<Vec<_>, _>>()?)
}

/// `credits`: `{"remaining": n, "refill": {"amount": n, "interval": "daily" | "monthly" | seconds}}`,
/// the refill optional or null.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreditsBody {
    remaining: serde_json::Number,
    #[serde(default)]
    refill: Option<RefillBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefillBody {
    amount: serde_json::Number,
    interval: serde_json::Value,
}

impl CreditsBody {
    fn parse(self) -> Result<Credits, ValidationError> {
        let whole = |number: &serde_json::Number| whole_number(number).ok_or(ValidationError::Credits);
        let credits = Credits::new(whole(&self.remaining)?)?;
        let Some(refill) = self.refill else { return Ok(credits) };
        let interval = match &refill.interval {
            serde_json::Value::String(named) if named != "daily" && named != "monthly" => {
                return Err(ValidationError::Credits);
            }
            serde_json::Value::String(named) => RefillInterval::from_text(named)?,
            serde_json::Value::Number(seconds) => RefillInterval::seconds(whole(seconds)?)?,
            _ => return Err(ValidationError::Credits),
        };
        Ok(credits.refill(Refill::new(whole(&refill.amount)?, interval)?))
    }
}

/// One of `ratelimits`: `{"name": "requests" (the default), "limit": n, "windowMs": n}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RateLimitBody {
    #[serde(default)]
    name: Option<String>,
    limit: serde_json::Number,
    window_ms: serde_json::Number,
}

impl RateLimitBody {
    fn parse(self) -> Result<RateLimit, ValidationError> {
        let whole = |number: &serde_json::Number| whole_number(number).ok_or(ValidationError::RateLimit);
        let limit = u32::try_from(whole(&self.limit)?).map_err(|_| ValidationError::RateLimit)?;
        let window = Duration::from_millis(whole(&self.window_ms)?);
        RateLimit::new(self.name.as_deref().unwrap_or(RateLimit::REQUESTS), limit, window)
    }
}

/// A JSON number that is a whole number from 0 to 2^53, as JSON Schema counts an integer
/// (`60.0` is one).
pub(super) fn whole_number(number: &serde_json::Number) -> Option<u64> {
    number.as_u64().or_else(|| {
        number.as_f64().filter(|n| n.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(n)).map(|n| n as u64)
    })
}

/// `POST /account/api-keys/{id}/roll`: `graceSeconds`, optional or null (no grace).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RollRequest {
    #[serde(default)]
    grace_seconds: Option<Sent<serde_json::Number>>,
}

impl RollRequest {
    /// The grace period: whole seconds, as JSON Schema counts an integer (`60.0` is one).
    pub(super) fn grace(self) -> Result<Duration, ApiError> {
        let Some(seconds) = self.grace_seconds else {
            return Ok(Duration::ZERO);
        };
        let seconds = seconds.valid().ok_or(ValidationError::GraceOutOfRange)?;
        Ok(Duration::from_secs(whole_number(&seconds).ok_or(ValidationError::GraceOutOfRange)?))
    }
}

/// A field's value as sent: of the type the field wants, or of another one.
#[derive(Debug)]
pub(super) enum Sent<T> {
    Valid(T),
    WrongType,
}

impl<T> Sent<T> {
    pub(super) fn valid(self) -> Option<T> {
        match self {
            Self::Valid(value) => Some(value),
            Self::WrongType => None,
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Sent<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = deserializer.deserialize_any(Strict)?;
        Ok(T::deserialize(value).map_or(Self::WrongType, Self::Valid))
    }
}

/// Reads a JSON value as serde_json's own `Value` does, except that an object giving a key twice
/// is an error at any depth: a repeat inside `credits` or `meta` is as ambiguous as one at the top.
struct Strict;

impl<'de> Visitor<'de> for Strict {
    type Value = serde_json::Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
        let mut array = Vec::new();
        while let Some(item) = items.next_element_seed(StrictSeed)? {
            array.push(item);
        }
        Ok(array.into())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = entries.next_key::<String>()? {
            let value = entries.next_value_seed(StrictSeed)?;
            if object.contains_key(&key) {
                // Serde's wording, which `body_error` turns into `duplicate_field`.
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
            object.insert(key, value);
        }
        Ok(object.into())
    }
}

struct StrictSeed;

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = serde_json::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(Strict)
    }
}

/// Reads an optional JSON object body into `T`: `T::default()` when the body is empty.
pub(super) fn json_body<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("The request body is larger than {BODY_LIMIT} bytes."),
        ),
        _ if timed_out(&rejection) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "The request body did not arrive in time; send it without pausing.",
        ),
        _ => ApiError::bad_request("invalid_body", "The request body could not be read."),
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the body as JSON, with Content-Type: application/json.",
        ));
    }
    // A derived struct would also take a JSON array of its fields in order; only an object is a body.
    if body.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
        return Err(not_an_object());
    }
    serde_json::from_slice(&body).map_err(body_error)
}

fn not_an_object() -> ApiError {
    ApiError::bad_request("invalid_json", "The body must be a JSON object.")
}

/// Whether reading the body failed because the client paused longer than the server's body
/// timeout (`serve`'s, or a host's own `RequestBodyTimeoutLayer`).
fn timed_out(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// What a body serde refused was wrong with: unknown or repeated fields, or not a JSON object.
fn body_error(error: serde_json::Error) -> ApiError {
    let at = format!("line {}, column {}", error.line(), error.column());
    if !error.is_data() {
        return ApiError::bad_request("invalid_json", format!("The body is not valid JSON ({at})."));
    }
    // Serde's own wording for these two, which `deny_unknown_fields` and the derive produce.
    let message = error.to_string();
    if let Some(field) = quoted_field(&message, "unknown field `") {
        return ApiError::bad_request(
            "unknown_field",
            format!("The body has a field this API does not know: {field}. Check its spelling ({at})."),
        );
    }
    if let Some(field) = quoted_field(&message, "duplicate field `") {
        return ApiError::bad_request("duplicate_field", format!("The body gives {field} more than once ({at})."));
    }
    not_an_object()
}

/// The field name serde quotes after `lead`, if it is a plain identifier: a name the client sent
/// is repeated only when it could be one of ours, never as arbitrary text.
fn quoted_field<'a>(message: &'a str, lead: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(lead)?;
    let field = &rest[..rest.find('`')?];
    let plain = !field.is_empty() && field.len() <= 32 && field.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    Some(if plain { field } else { "(a field)" })
}

fn parse_timestamp(text: Option<&str>) -> Result<OffsetDateTime, ApiError> {
    text.and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok()).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_expires_at",
            "expiresAt must be an RFC 3339 timestamp such as 2026-01-01T00:00:00Z, or null.",
        )
    })
}

/// `application/json`, with or without parameters, or any `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(body: &str) -> Result<NewKey, &'static str> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let request = json_body::<CreateRequest>(&headers, Ok(Bytes::copy_from_slice(body.as_bytes())));
        request.and_then(CreateRequest::into_new_key).map_err(|error| error.code())
    }

    #[test]
    fn a_repeated_field_is_refused_not_overwritten() {
        let body = r#"{"expiresAt": "2000-01-01T00:00:00Z", "expiresAt": null}"#;
        assert_eq!(create(body), Err("duplicate_field"));
        assert_eq!(create(r#"{"name": "a", "name": "b"}"#), Err("duplicate_field"));
        assert_eq!(create(r#"{"credits": {"remaining": 1000000, "remaining": 1}}"#), Err("duplicate_field"));
        assert_eq!(create(r#"{"meta": {"a": [{"b": 1, "b": 2}]}}"#), Err("duplicate_field"));
        assert_eq!(create(r#"{"ratelimits": [{"limit": 1, "windowMs": 1, "limit": 9}]}"#), Err("duplicate_field"));
        assert!(create(r#"{"meta": {"a": {"b": 1}, "b": {"a": 2}}}"#).is_ok(), "the same key in two objects");
    }

    #[test]
    fn usage_fields_are_read_and_each_has_its_own_code() {
        let new = create(
            r#"{"ownerId": "u", "meta": {"x": 1}, "credits": {"remaining": 5.0, "refill": {"amount": 2, "interval": 60}},
                "ratelimits": [{"limit": 3, "windowMs": 1000.0}]}"#,
        )
        .unwrap();
        assert_eq!(new.owner.unwrap().as_str(), "u");
        assert_eq!(new.meta.unwrap().as_str(), r#"{"x":1}"#);
        let credits = new.credits.unwrap();
        assert_eq!((credits.remaining, credits.refill.unwrap().interval), (5, RefillInterval::seconds(60).unwrap()));
        let limits = new.ratelimits.unwrap();
        assert_eq!(
            limits.get("requests").map(|limit| (limit.limit(), limit.window())),
            Some((3, Duration::from_secs(1)))
        );
        assert_eq!(create(r#"{"ownerId": ["u"]}"#), Err("invalid_owner_id"));
        assert_eq!(create(r#"{"meta": "{}"}"#), Err("invalid_meta"));
        assert_eq!(
            create(r#"{"credits": {"remaining": 1, "refill": {"amount": 1, "interval": "Daily"}}}"#),
            Err("invalid_credits")
        );
        assert_eq!(create(r#"{"ratelimits": {"limit": 1, "windowMs": 1}}"#), Err("invalid_ratelimits"));
        assert_eq!(
            create(r#"{"ownerId": null, "meta": null, "credits": null, "ratelimits": null}"#),
            Ok(NewKey::default())
        );
    }

    #[test]
    fn each_field_has_its_own_code() {
        assert_eq!(create(r#"{"name": 42}"#), Err("invalid_name"));
        assert_eq!(create(r#"{"expiresAt": 42}"#), Err("invalid_expires_at"));
        assert_eq!(create(r#"{"scopes": "orders:read"}"#), Err("invalid_scopes"));
        assert_eq!(create(r#"{"scopes": [1]}"#), Err("invalid_scopes"));
        assert_eq!(create(r#"{"expires_at": null}"#), Err("unknown_field"));
        assert_eq!(create(r#"["name"]"#), Err("invalid_json"));
        assert_eq!(create(r#"{"name": "#), Err("invalid_json"));
    }

    #[test]
    fn nulls_and_an_empty_object_create_a_default_key() {
        assert_eq!(create(r#"{"name": null, "expiresAt": null, "scopes": null}"#), Ok(NewKey::default()));
        assert_eq!(create("{}"), Ok(NewKey::default()));
        assert_eq!(create("  "), Ok(NewKey::default()));
    }

    #[test]
    fn an_unknown_field_is_named_only_when_it_is_a_plain_identifier() {
        let field = |message: &'static str| quoted_field(message, "unknown field `");
        assert_eq!(field("unknown field `expires_at`, expected one of"), Some("expires_at"));
        assert_eq!(field("unknown field `as_live_v1_x y`, expected"), Some("(a field)"));
    }

    #[test]
    fn grace_is_whole_seconds_however_written() {
        let grace = |body: &str| {
            serde_json::from_str::<RollRequest>(body)
                .map_err(body_error)
                .and_then(RollRequest::grace)
                .map_err(|e| e.code())
        };
        assert_eq!(grace(r#"{"graceSeconds": 60}"#), Ok(Duration::from_secs(60)));
        assert_eq!(grace(r#"{"graceSeconds": 85278.0}"#), Ok(Duration::from_secs(85278)));
        assert_eq!(grace(r#"{"graceSeconds": null}"#), Ok(Duration::ZERO));
        for bad in [r#"{"graceSeconds": 1.5}"#, r#"{"graceSeconds": -1}"#, r#"{"graceSeconds": "1d"}"#] {
            assert_eq!(grace(bad), Err("invalid_grace"), "{bad}");
        }
    }
}
