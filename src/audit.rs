//! The audit trail: an [`AuditEvent`] for every change, which the store writes in the change's
//! own transaction, so that the trail and the keys can never disagree, whatever crashes.
//!
//! An event names who acted ([`Actor`]), what happened ([`Action`]), to which key, in which
//! request ([`RequestId`]), and the change's details: the metadata the change set, never a token
//! or a digest. [`AuditEvent::to_json`] is its one JSON form, for the HTTP API, the command-line
//! tool and webhooks alike.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::{Map, Value};
use smol_str::SmolStr;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::clock::{from_unix_micros, normalize, unix_micros};
use crate::error::ValidationError;
use crate::id::{AccountId, KeyId};
use crate::webhook::EndpointName;

/// The id of an audit event: a TypeID `ev_…` over a UUIDv7, like a [`KeyId`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// The TypeID prefix of every event id.
    pub const PREFIX: &'static str = "ev_";

    /// A new id for an event happening now.
    pub(crate) fn generate() -> Self {
        Self(Uuid::now_v7())
    }
}

crate::id::typeid!(EventId, ValidationError::EventId);

/// Who made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorType {
    /// A key of the account, through the API.
    Key,
    /// An administrator: the dashboard, the command-line tool, the host's own code.
    Admin,
    /// The service itself, e.g. the first key `apikeys serve` makes.
    System,
}

impl ActorType {
    /// `"key"`, `"admin"` or `"system"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Admin => "admin",
            Self::System => "system",
        }
    }
}

impl FromStr for ActorType {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "key" => Ok(Self::Key),
            "admin" => Ok(Self::Admin),
            "system" => Ok(Self::System),
            _ => Err(ValidationError::Actor),
        }
    }
}

/// Who made a change: a key (by its id), or an administrator or the system by a label the host
/// chooses (`"admin"` and `"system"` unless it chooses one), 1 to 64 characters of letters,
/// digits, `_`, `-`, `.`, `:` or `@`.
///
/// ```
/// # use apikeys::audit::{Actor, ActorType};
/// let actor = Actor::admin("dashboard")?;
/// assert_eq!((actor.kind(), actor.id()), (ActorType::Admin, "dashboard"));
/// assert!(Actor::admin("two words").is_err());
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor {
    kind: ActorType,
    id: SmolStr,
}

impl Actor {
    /// The longest label of an administrator or the system.
    pub const MAX_LEN: usize = 64;

    /// A key of the account.
    pub fn key(id: KeyId) -> Self {
        Self { kind: ActorType::Key, id: SmolStr::new(id.to_string()) }
    }

    /// An administrator, by a label.
    pub fn admin(label: &str) -> Result<Self, ValidationError> {
        Self::new(ActorType::Admin, label)
    }

    /// The system, by a label.
    pub fn system(label: &str) -> Result<Self, ValidationError> {
        Self::new(ActorType::System, label)
    }

    /// An actor of any type as a store read it back: a key's id must be a [`KeyId`].
    pub fn new(kind: ActorType, id: &str) -> Result<Self, ValidationError> {
        let valid = match kind {
            ActorType::Key => id.parse::<KeyId>().is_ok(),
            ActorType::Admin | ActorType::System => is_label(id, Self::MAX_LEN),
        };
        valid.then(|| Self { kind, id: SmolStr::new(id) }).ok_or(ValidationError::Actor)
    }

    /// The actor of expiry notices.
    pub(crate) fn expiry() -> Self {
        Self::system_static("expiry")
    }

    /// A system actor of a label known to be valid.
    pub(crate) fn system_static(label: &'static str) -> Self {
        Self { kind: ActorType::System, id: SmolStr::new_static(label) }
    }

    /// The administrator path's actor when the host names none.
    pub(crate) fn default_admin() -> Self {
        Self::admin_static("admin")
    }

    /// An administrator of a label known to be valid.
    pub(crate) fn admin_static(label: &'static str) -> Self {
        Self { kind: ActorType::Admin, id: SmolStr::new_static(label) }
    }

    /// The type of actor.
    pub fn kind(&self) -> ActorType {
        self.kind
    }

    /// The key's id, or the label.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// `text` if it is 1 to `max` letters, digits or `_-.:@`: safe in a log line and a header.
fn is_label(text: &str, max: usize) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b);
    !text.is_empty() && text.len() <= max && text.bytes().all(allowed)
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// A key was created; `detail` holds its metadata.
    KeyCreated,
    /// A key was revoked.
    KeyRevoked,
    /// A key was rolled; the event's key is the old one, and `detail` names the new one.
    KeyRolled,
    /// A key's name, meta, credits or rate limits changed; `detail` holds what was set.
    KeyUpdated,
    /// A key expires within a week: the notice, recorded once per key; `detail` holds its
    /// prefix, name and expiry. Not a change: the key is as it was.
    KeyExpiring,
    /// A key was revoked because it was reported leaked; `detail` holds its prefix, name and
    /// the reporter's `sourceUrl` (or null). The actor is the reporter, `system:github` or
    /// `system:leak-report`.
    KeyLeaked,
    /// An owner's shared limits changed; the event names no key, and `detail` holds the owner
    /// and what was set.
    OwnerUpdated,
}

impl Action {
    /// Every action, in the order of the list above.
    pub const ALL: [Self; 7] = [
        Self::KeyCreated,
        Self::KeyRevoked,
        Self::KeyRolled,
        Self::KeyUpdated,
        Self::KeyExpiring,
        Self::KeyLeaked,
        Self::OwnerUpdated,
    ];

    /// `"key.created"`, `"key.revoked"`, `"key.rolled"`, `"key.updated"`, `"key.expiring"`,
    /// `"key.leaked"` or `"owner.updated"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyCreated => "key.created",
            Self::KeyRevoked => "key.revoked",
            Self::KeyRolled => "key.rolled",
            Self::KeyUpdated => "key.updated",
            Self::KeyExpiring => "key.expiring",
            Self::KeyLeaked => "key.leaked",
            Self::OwnerUpdated => "owner.updated",
        }
    }
}

impl FromStr for Action {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|action| action.as_str() == s).ok_or(ValidationError::Action)
    }
}

/// The id of the request that made a change, for finding its log lines: what the client sent
/// as `x-request-id`, if it is 1 to 128 characters of letters, digits or `_-.:@`; otherwise one
/// the service makes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(SmolStr);

impl RequestId {
    /// The longest request id.
    pub const MAX_LEN: usize = 128;

    /// Validates a request id. One that holds `_v1_` is refused: it could hold a token, which a
    /// request id is kept and logged as.
    pub fn new(id: &str) -> Result<Self, ValidationError> {
        let valid = is_label(id, Self::MAX_LEN) && !crate::token::may_hold_token(id);
        valid.then(|| Self(SmolStr::new(id))).ok_or(ValidationError::RequestId)
    }

    /// A new id: `req_` and 32 hex digits of a UUIDv7.
    pub fn generate() -> Self {
        Self(SmolStr::new(format!("req_{}", Uuid::now_v7().simple())))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({:?})", self.0.as_str())
    }
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditEvent {
    /// The event's id.
    pub id: EventId,
    /// When the change was made, by the service's clock.
    pub at: OffsetDateTime,
    /// The account the change belongs to.
    pub account: AccountId,
    /// Who made it.
    pub actor: Actor,
    /// What it did.
    pub action: Action,
    /// The key it changed; `None` for an owner's limits.
    pub key_id: Option<KeyId>,
    /// The request it was made in, if it came through one.
    pub request_id: Option<RequestId>,
    /// What the change set, as the API names it (`name`, `scopes`, `expiresAt`, `credits`, …).
    pub detail: Map<String, Value>,
}

impl AuditEvent {
    /// An event with a new id, for a store outside this crate's tests; the service makes its own.
    pub fn new(at: OffsetDateTime, account: AccountId, actor: Actor, action: Action, key_id: Option<KeyId>) -> Self {
        Self { id: EventId::generate(), at, account, actor, action, key_id, request_id: None, detail: Map::new() }
    }

    /// The event as the audit-log API, the command-line tool and webhooks show it: `{"id", "at",
    /// "account", "actor": {"type", "id"}, "action", "keyId", "requestId", "detail"}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "id": self.id.to_string(),
            "at": rfc3339(self.at),
            "account": self.account.as_str(),
            "actor": {"type": self.actor.kind.as_str(), "id": self.actor.id()},
            "action": self.action.as_str(),
            "keyId": self.key_id.map(|id| id.to_string()),
            "requestId": self.request_id.as_ref().map(RequestId::as_str),
            "detail": self.detail,
        })
    }

    /// `detail` as compact JSON text, as the stores keep it.
    #[cfg(any(feature = "sqlite", feature = "redb", feature = "postgres"))]
    pub(crate) fn detail_text(&self) -> String {
        // A map of JSON values always serializes.
        serde_json::to_string(&self.detail).unwrap_or_default()
    }

    /// Where this event is in the trail's order, as a cursor: the next page starts after it.
    pub fn cursor(&self) -> AuditCursor {
        AuditCursor { at: unix_micros(self.at), id: self.id }
    }
}

/// What a change writes beside itself, in its own transaction: its audit event, and a webhook
/// delivery of it into the outbox for each endpoint the service has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    event: AuditEvent,
    deliveries: Arc<[EndpointName]>,
    body: String,
}

impl Entry {
    /// The event, to be delivered to each of `endpoints` (each name once), its time cut to whole
    /// microseconds as the stores keep it, so that the body is the audit-log item exactly.
    pub fn new(mut event: AuditEvent, endpoints: Arc<[EndpointName]>) -> Self {
        event.at = normalize(event.at).unwrap_or(event.at);
        let distinct = endpoints.iter().enumerate().all(|(i, name)| !endpoints[..i].contains(name));
        let deliveries = if distinct {
            endpoints
        } else {
            let mut names: Vec<EndpointName> = endpoints.to_vec();
            names.sort();
            names.dedup();
            names.into()
        };
        let body = if deliveries.is_empty() { String::new() } else { event.to_json().to_string() };
        Self { event, deliveries, body }
    }

    /// The audit event.
    pub fn event(&self) -> &AuditEvent {
        &self.event
    }

    /// The endpoints a delivery of the event goes into the outbox for.
    pub fn deliveries(&self) -> &[EndpointName] {
        &self.deliveries
    }

    /// The body of each delivery: the event's JSON (empty when there are no deliveries).
    pub fn body(&self) -> &str {
        &self.body
    }
}

impl From<AuditEvent> for Entry {
    /// The event alone, delivered nowhere.
    fn from(event: AuditEvent) -> Self {
        Self { event, deliveries: Arc::from([]), body: String::new() }
    }
}

/// A time in RFC 3339, UTC, as the API writes times.
pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A place in an account's audit trail, which is ordered newest first by `at` and then by id:
/// a page read [`after`](AuditQuery::after) it starts with the next older event. Its text form
/// is opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuditCursor {
    at: i64,
    id: EventId,
}

impl AuditCursor {
    /// The time of the event it points at, in Unix microseconds, as the stores order by it.
    pub fn at_micros(&self) -> i64 {
        self.at
    }

    /// The id of the event it points at.
    pub fn id(&self) -> EventId {
        self.id
    }
}

impl fmt::Display for AuditCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.at, self.id)
    }
}

impl FromStr for AuditCursor {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (at, id) = s.split_once('.').ok_or(ValidationError::Cursor)?;
        let unsigned = at.strip_prefix('-').unwrap_or(at);
        let digits = !unsigned.is_empty() && unsigned.len() <= 19 && unsigned.bytes().all(|b| b.is_ascii_digit());
        let at: i64 = at.parse().ok().filter(|_| digits).ok_or(ValidationError::Cursor)?;
        from_unix_micros(at).ok_or(ValidationError::Cursor)?;
        Ok(Self { at, id: id.parse().map_err(|_| ValidationError::Cursor)? })
    }
}

/// Which page of an account's audit trail to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditQuery {
    /// Start after this place; `None`: with the newest event.
    pub after: Option<AuditCursor>,
    /// At most this many events.
    pub limit: u32,
}

impl AuditQuery {
    /// Where the page ends, exclusive, as the file stores order events: `(at µs, id bytes)` of
    /// the cursor, or a place past any event (no time reaches `i64::MAX` µs).
    #[cfg(any(feature = "sqlite", feature = "redb"))]
    pub(crate) fn before(&self) -> (i64, [u8; 16]) {
        self.after.map_or((i64::MAX, [0xff; 16]), |after| (after.at, *after.id.as_uuid().as_bytes()))
    }
}

/// One page of an account's audit trail, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// The events.
    pub events: Vec<AuditEvent>,
    /// Where the next page starts, if there are older events.
    pub next: Option<AuditCursor>,
}

/// An event as the stores keep it: ids as UUID bytes, the time as Unix microseconds, the actor,
/// action and detail as text. Borrowed from the row or value it was read from.
#[cfg(any(feature = "sqlite", feature = "redb", feature = "postgres"))]
pub(crate) struct StoredEvent<'a> {
    pub(crate) id: [u8; 16],
    pub(crate) account: &'a str,
    pub(crate) at: i64,
    pub(crate) actor_type: &'a str,
    pub(crate) actor_id: &'a str,
    pub(crate) action: &'a str,
    pub(crate) key_id: Option<[u8; 16]>,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) detail: &'a str,
}

#[cfg(any(feature = "sqlite", feature = "redb", feature = "postgres"))]
impl<'a> StoredEvent<'a> {
    /// The stored form of `event`.
    pub(crate) fn of(event: &'a AuditEvent, detail: &'a str) -> Self {
        Self {
            id: *event.id.as_uuid().as_bytes(),
            account: event.account.as_str(),
            at: unix_micros(event.at),
            actor_type: event.actor.kind.as_str(),
            actor_id: event.actor.id(),
            action: event.action.as_str(),
            key_id: event.key_id.map(|id| *id.as_uuid().as_bytes()),
            request_id: event.request_id.as_ref().map(RequestId::as_str),
            detail,
        }
    }

    /// The event, or the name of the first field that holds no valid value (a corrupt file).
    pub(crate) fn decode(self) -> Result<AuditEvent, &'static str> {
        let kind = self.actor_type.parse().map_err(|_| "actor_type")?;
        Ok(AuditEvent {
            id: EventId::from_uuid(Uuid::from_bytes(self.id)),
            at: from_unix_micros(self.at).ok_or("at")?,
            account: AccountId::new(self.account).map_err(|_| "account")?,
            actor: Actor::new(kind, self.actor_id).map_err(|_| "actor_id")?,
            action: self.action.parse().map_err(|_| "action")?,
            key_id: self.key_id.map(|id| KeyId::from_uuid(Uuid::from_bytes(id))),
            request_id: self.request_id.map(RequestId::new).transpose().map_err(|_| "request_id")?,
            detail: serde_json::from_str(self.detail).map_err(|_| "detail")?,
        })
    }
}

/// The details each action records: what the change set, as the API names it.
pub(crate) mod detail {
    use serde_json::{Map, Value, json};

    use super::rfc3339;
    use crate::id::OwnerId;
    use crate::key::KeyUpdate;
    use crate::owner::OwnerUpdate;
    use crate::store::{KeyRecord, Roll};
    use crate::usage::{Credits, Meta, RateLimits};

    /// A created key's metadata: its prefix, name, scopes and expiry, and its owner, meta,
    /// credits and rate limits where it has them.
    pub(crate) fn created(record: &KeyRecord) -> Map<String, Value> {
        let mut detail = Map::new();
        detail.insert("prefix".into(), json!(record.prefix.as_str()));
        detail.insert("name".into(), json!(record.name.as_deref()));
        detail.insert("scopes".into(), json!(record.scopes.iter().collect::<Vec<_>>()));
        detail.insert("expiresAt".into(), json!(record.expires_at.map(rfc3339)));
        if let Some(owner) = &record.owner {
            detail.insert("ownerId".into(), json!(owner.as_str()));
        }
        let credits = record.credits.map(|balance| Some(balance.at(balance.as_of)));
        let ratelimits = Some(&record.ratelimits).filter(|limits| !limits.is_empty());
        set_limits(&mut detail, record.meta.as_ref().map(Some), credits, ratelimits);
        detail
    }

    /// What an update set; `null` for what it took away.
    pub(crate) fn updated(update: &KeyUpdate) -> Map<String, Value> {
        let mut detail = Map::new();
        if let Some(name) = &update.name {
            detail.insert("name".into(), json!(name.as_deref()));
        }
        set_limits(&mut detail, update.meta.as_ref().map(Option::as_ref), update.credits, update.ratelimits.as_ref());
        detail
    }

    /// The owner, and what the change of its limits set.
    pub(crate) fn owner_updated(owner: &OwnerId, update: &OwnerUpdate) -> Map<String, Value> {
        let mut detail = Map::new();
        detail.insert("ownerId".into(), json!(owner.as_str()));
        set_limits(&mut detail, None, update.credits, update.ratelimits.as_ref());
        detail
    }

    /// What an expiry notice tells of the key: its prefix, name and expiry.
    pub(crate) fn expiring(record: &KeyRecord) -> Map<String, Value> {
        let mut detail = Map::new();
        detail.insert("prefix".into(), json!(record.prefix.as_str()));
        detail.insert("name".into(), json!(record.name.as_deref()));
        detail.insert("expiresAt".into(), json!(record.expires_at.map(rfc3339)));
        detail
    }

    /// The new key of a roll, and when the old one now ends.
    pub(crate) fn rolled(roll: &Roll) -> Map<String, Value> {
        let mut detail = Map::new();
        detail.insert("newKeyId".into(), json!(roll.new_key().id.to_string()));
        detail.insert("newPrefix".into(), json!(roll.new_key().prefix.as_str()));
        detail.insert("expiresAt".into(), json!(rfc3339(roll.old_expires_at())));
        detail
    }

    fn set_limits(
        detail: &mut Map<String, Value>,
        meta: Option<Option<&Meta>>,
        credits: Option<Option<Credits>>,
        ratelimits: Option<&RateLimits>,
    ) {
        if let Some(meta) = meta {
            detail.insert("meta".into(), meta.map_or(Value::Null, |meta| Value::Object(meta.to_object())));
        }
        if let Some(credits) = credits {
            detail.insert("credits".into(), credits.map_or(Value::Null, Credits::to_json));
        }
        if let Some(ratelimits) = ratelimits {
            detail.insert("ratelimits".into(), ratelimits.to_json());
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn event_ids_round_trip_and_are_not_key_ids() {
        let id = EventId::generate();
        assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
        assert!(id.to_string().starts_with("ev_"));
        assert_eq!(KeyId::from_uuid(*id.as_uuid()).to_string().parse::<EventId>(), Err(ValidationError::EventId));
    }

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let event = AuditEvent::new(
            datetime!(2026-01-02 03:04:05.678901 UTC),
            AccountId::new("a").unwrap(),
            Actor::default_admin(),
            Action::KeyCreated,
            None,
        );
        let cursor = event.cursor();
        assert_eq!(cursor.to_string().parse::<AuditCursor>(), Ok(cursor));
        let id = event.id;
        let before_1970 = AuditCursor { at: -1, id };
        assert_eq!(before_1970.to_string().parse::<AuditCursor>(), Ok(before_1970), "a clock before 1970");
        for bad in [
            String::new(),
            ".".into(),
            format!("-.{id}"),
            format!("+1.{id}"),
            format!("--1.{id}"),
            format!("1.{id}x"),
            format!("99999999999999999999.{id}"),
            format!("{}", id),
            "1.ak_01j9zxkp4qbc7n3m8td5e6fvg2".into(),
        ] {
            assert_eq!(bad.parse::<AuditCursor>(), Err(ValidationError::Cursor), "{bad:?}");
        }
    }

    #[test]
    fn labels_and_request_ids_hold_only_safe_characters() {
        assert!(Actor::system("serve").is_ok());
        assert!(RequestId::new("0b5e3c6e-5a1f-4a6e-9d1e-1f2a3b4c5d6e").is_ok());
        for bad in ["", "a b", "new\nline", "quote\"", "é"] {
            assert_eq!(Actor::admin(bad), Err(ValidationError::Actor), "{bad:?}");
            assert_eq!(RequestId::new(bad), Err(ValidationError::RequestId), "{bad:?}");
        }
        assert!(RequestId::new(&"r".repeat(129)).is_err());
        assert!(Actor::new(ActorType::Key, "admin").is_err(), "a key actor is a key id");
        assert!(RequestId::generate().as_str().starts_with("req_"));
        assert!(RequestId::new("as_live_v1_abcdefghijklmnopqrstuvwxyz234567abcdefg").is_err(), "a token");
    }

    #[test]
    fn actions_read_back_from_their_names() {
        for action in Action::ALL {
            assert_eq!(action.as_str().parse::<Action>(), Ok(action));
        }
        assert!("key.deleted".parse::<Action>().is_err());
    }
}
