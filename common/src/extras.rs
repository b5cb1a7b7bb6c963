//! What is kept beside a message. An inbox message is immutable, so the attachment records
//! (`af_attachments`) and the metadata attached after enqueue (`af_message_metadata`) live apart
//! from it, and are merged into its payload wherever the payload is served: the hydration bundle
//! (hydration) and `listQueueItemsForConversation` (queue-manager). Hydration alone writes both
//! buckets; this module is how either service reads them and applies them to a payload.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::attachments::{Attachment, AttachmentStatus};
use crate::api::history::BundleAttachment;
use crate::clock::Millis;
use crate::store::StoreError;
use crate::token::escape;
use crate::topology::Buckets;

/// The metadata attached to one message after enqueue (`af_message_metadata`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageMetadata {
    pub message_id: String,
    pub conversation_id: String,
    /// Merged over the payload's own `metadata` (these keys win).
    pub metadata: BTreeMap<String, String>,
    pub updated_at: Millis,
}

/// Key of a message's metadata record: a conversation's records are one prefix scan.
pub fn metadata_key(conversation_id: &str, message_id: &str) -> String {
    format!("{}.{}", escape(conversation_id), escape(message_id))
}

/// Key of an attachment record: a message's records are one prefix scan.
pub fn attachment_key(message_id: &str, storage_id: &str) -> String {
    format!("{}.{}", escape(message_id), escape(storage_id))
}

/// The metadata attached to one message, if any.
pub async fn metadata_of(
    buckets: &Buckets,
    conversation_id: &str,
    message_id: &str,
) -> Result<Option<BTreeMap<String, String>>, StoreError> {
    let record = buckets.message_metadata.get::<MessageMetadata>(&metadata_key(conversation_id, message_id)).await?;
    Ok(record.map(|r| r.value.metadata))
}

/// The metadata attached to the messages of one conversation, by messageId.
pub async fn metadata_of_conversation(
    buckets: &Buckets,
    conversation_id: &str,
) -> Result<HashMap<String, BTreeMap<String, String>>, StoreError> {
    let records = buckets.message_metadata.scan::<MessageMetadata>(&format!("{}.*", escape(conversation_id))).await?;
    Ok(records.into_iter().map(|(_, v)| (v.value.message_id, v.value.metadata)).collect())
}

/// The attachment records of one message, oldest first.
pub async fn attachments_of(buckets: &Buckets, message_id: &str) -> Result<Vec<Attachment>, StoreError> {
    let records = buckets.attachments.scan::<Attachment>(&format!("{}.*", escape(message_id))).await?;
    let mut out: Vec<Attachment> = records.into_iter().map(|(_, v)| v.value).collect();
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.storage_id.cmp(&b.storage_id)));
    Ok(out)
}

/// Merges `extra` into `payload.metadata` (new keys win), as the original's
/// `attachMessageMetadata` patched the stored payload.
pub fn merge_metadata(payload: &mut Map<String, Value>, extra: &BTreeMap<String, String>) {
    if extra.is_empty() {
        return;
    }
    let metadata = payload.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    if let Some(map) = metadata.as_object_mut() {
        for (key, value) in extra {
            map.insert(key.clone(), Value::String(value.clone()));
        }
    }
}

/// Gives the payload's attachments their recorded status (and whatever else the record knows)
/// and `link(record)` as `downloadUrl` while ready; records of the message that the payload does
/// not list (attached later with `attachMessageMedia`) are appended. A `downloadUrl` in the
/// stored payload is never passed on (spec §1.3).
pub fn apply_attachment_records(
    payload: &mut Map<String, Value>,
    records: &[Attachment],
    link: impl Fn(&Attachment) -> Option<String>,
) {
    let listed = payload.get("attachments").and_then(Value::as_array).is_some();
    if records.is_empty() && !listed {
        return;
    }
    let mut items: Vec<Value> = payload.get("attachments").and_then(Value::as_array).cloned().unwrap_or_default();
    for item in &mut items {
        if let Some(obj) = item.as_object_mut() {
            obj.remove("downloadUrl");
        }
    }
    for record in records {
        let view = BundleAttachment {
            kind: record.kind.clone(),
            status: record.status,
            storage_id: record.storage_id.clone(),
            telegram_file_id: record.telegram_file_id.clone(),
            file_name: record.file_name.clone(),
            mime_type: record.mime_type.clone(),
            size_bytes: record.size_bytes,
            expires_at: record.expires_at,
            download_url: if record.status == AttachmentStatus::Ready { link(record) } else { None },
        };
        let Ok(view) = serde_json::to_value(view) else { continue };
        let same = |v: &&mut Value| v.get("storageId").and_then(Value::as_str) == Some(record.storage_id.as_str());
        match items.iter_mut().find(|v| same(v)) {
            Some(item) => *item = view,
            None => items.push(view),
        }
    }
    payload.insert("attachments".to_string(), Value::Array(items));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(storage_id: &str, status: AttachmentStatus) -> Attachment {
        Attachment {
            message_id: "m1".into(),
            conversation_id: "c1".into(),
            agent_key: "a".into(),
            provider: "telegram".into(),
            kind: "photo".into(),
            status,
            storage_id: storage_id.into(),
            telegram_file_id: "tg".into(),
            file_name: None,
            mime_type: Some("image/png".into()),
            size_bytes: 3,
            created_at: 1,
            expires_at: 2,
        }
    }

    #[test]
    fn metadata_merges_with_new_keys_winning() {
        let mut payload = json!({"metadata": {"a": "1", "providerUserId": "u"}}).as_object().cloned().unwrap();
        merge_metadata(&mut payload, &BTreeMap::from([("a".to_string(), "2".to_string()), ("b".into(), "3".into())]));
        assert_eq!(payload["metadata"], json!({"a": "2", "b": "3", "providerUserId": "u"}));
        let mut bare = Map::new();
        merge_metadata(&mut bare, &BTreeMap::from([("k".to_string(), "v".to_string())]));
        assert_eq!(Value::Object(bare), json!({"metadata": {"k": "v"}}));
    }

    #[test]
    fn records_decide_status_and_links_and_stored_links_are_dropped() {
        let mut payload = json!({"attachments": [
            {"kind": "photo", "status": "ready", "storageId": "s1", "downloadUrl": "http://evil"},
            {"kind": "photo", "storageId": "s-unrecorded", "downloadUrl": "http://evil"},
        ]})
        .as_object()
        .cloned()
        .unwrap();
        let records = [record("s1", AttachmentStatus::Expired), record("s2", AttachmentStatus::Ready)];
        apply_attachment_records(&mut payload, &records, |r| Some(format!("/v1/media/{}", r.storage_id)));
        let items = payload["attachments"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0]["status"], "expired");
        assert!(items[0].get("downloadUrl").is_none());
        assert!(items[1].get("downloadUrl").is_none());
        assert_eq!(items[2]["downloadUrl"], "/v1/media/s2");
    }
}
