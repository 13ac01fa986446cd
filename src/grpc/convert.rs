//! Conversions between wire types and domain types.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use super::proto;
use crate::domain::{
    decision::{Decision, DenyReason, Principal},
    model::{KeyRecord, KeyStatus},
    validation::{InvalidArgument, timestamp_from_parts},
};

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(field: &str, ts: &Timestamp) -> Result<DateTime<Utc>, InvalidArgument> {
    timestamp_from_parts(ts.seconds, ts.nanos).map_err(|e| InvalidArgument(format!("{field}: {e}")))
}

pub fn api_key(record: &KeyRecord, now: DateTime<Utc>) -> proto::ApiKey {
    proto::ApiKey {
        id: record.id,
        name: record.name.clone(),
        created_at: Some(timestamp(record.created_at)),
        expires_at: record.expires_at.map(timestamp),
        enabled: record.enabled,
        status: key_status(record.status(now)) as i32,
        last_used_at: record.last_used_at.map(timestamp),
        created_by: record.created_by.clone(),
    }
}

pub fn key_status(status: KeyStatus) -> proto::KeyStatus {
    match status {
        KeyStatus::Active => proto::KeyStatus::Active,
        KeyStatus::Disabled => proto::KeyStatus::Disabled,
        KeyStatus::Expired => proto::KeyStatus::Expired,
    }
}

pub fn deny_reason(reason: DenyReason) -> proto::DenyReason {
    match reason {
        DenyReason::MissingCredentials => proto::DenyReason::MissingCredentials,
        DenyReason::MalformedCredentials => proto::DenyReason::MalformedCredentials,
        DenyReason::InvalidCredentials => proto::DenyReason::InvalidCredentials,
        DenyReason::KeyExpired => proto::DenyReason::KeyExpired,
        DenyReason::KeyDisabled => proto::DenyReason::KeyDisabled,
        DenyReason::RateLimited => proto::DenyReason::RateLimited,
    }
}

pub fn authorize_response(decision: &Decision) -> proto::AuthorizeResponse {
    match decision {
        Decision::Allow(Principal::Key { id, name }) => proto::AuthorizeResponse {
            allowed: true,
            key_id: *id,
            key_name: name.to_string(),
            ..Default::default()
        },
        Decision::Allow(Principal::User { username }) => proto::AuthorizeResponse {
            allowed: true,
            username: username.clone(),
            ..Default::default()
        },
        Decision::Deny { reason, .. } => proto::AuthorizeResponse {
            allowed: false,
            reason: deny_reason(*reason) as i32,
            ..Default::default()
        },
    }
}
