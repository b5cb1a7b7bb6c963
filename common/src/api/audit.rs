//! The audit log's contracts (issue 14 item 6): one record per admin call of an operation that
//! changes something, appended by the operation transport (`crate::audit`) to the `AF_AUDIT`
//! stream, and `listAuditLog` to read them back.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The default and the largest `limit` of `listAuditLog`.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

/// `listAuditLog`: records newest first, optionally filtered, in pages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListAuditLogArgs {
    /// Only records made at or after this time (ms since the epoch, the stack's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
    /// Only records of this operation (its catalogue name, e.g. `importPlaintextSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Records per page, 1–1000; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The `nextCursor` of the previous page; absent for the newest records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// How an audited call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditOutcome {
    pub ok: bool,
    /// The error code (`invalid_input`, `not_found`, …) when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// One audited call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// The stream sequence of the record (set when read back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// When the call finished, ms since the epoch (the stack's clock).
    pub at_ms: i64,
    /// The caller's role (`admin`).
    pub role: String,
    /// Who called: for a static token the first 12 hex digits of its SHA-256, never the token.
    pub principal: String,
    pub operation: String,
    /// The service that served the call.
    pub service: String,
    pub outcome: AuditOutcome,
    pub duration_ms: f64,
    /// The W3C trace id of the call, when it carried trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The arguments as sent, with every secret field's value replaced by `"[REDACTED]"`. When
    /// their JSON exceeds 8 KiB, a string holding its first 8 KiB (see `argsTruncated`); when
    /// the body was not a JSON object, a string saying only its size.
    pub args: serde_json::Value,
    #[serde(default)]
    pub args_truncated: bool,
}

/// A page of `listAuditLog`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditLogPage {
    /// Newest first.
    pub records: Vec<AuditRecord>,
    /// Pass as `cursor` for the next (older) page; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
