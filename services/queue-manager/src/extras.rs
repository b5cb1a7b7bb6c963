//! What is stored beside a conversation's messages (`common::extras`: attachment records and
//! metadata attached after enqueue, both written by hydration), applied to the payloads that
//! `listQueueItemsForConversation` shows. The dispatcher's answer is left untouched when the
//! conversation has none of it; otherwise its unfinished items (the ones that carry a payload)
//! get their attached metadata merged in and their listed attachments' recorded status. Links are not
//! handed out here: downloading is for the worker holding the lease, through its bundle.

use common::OpError;
use common::api::queue::JobView;
use common::extras::{apply_attachment_records, attachments_of, merge_metadata, metadata_of_conversation};
use common::service::ServiceContext;
use serde_json::Value;

use crate::dispatcher::Answer;

pub async fn apply_to_queue_items(
    ctx: &ServiceContext,
    conversation_id: &str,
    answer: Answer,
) -> Result<Answer, OpError> {
    let has_attachments = answer.get().contains("\"attachments\"");
    let metadata = metadata_of_conversation(&ctx.buckets, conversation_id).await.map_err(OpError::internal)?;
    if metadata.is_empty() && !has_attachments {
        return Ok(answer);
    }
    let mut rows: Vec<JobView> = serde_json::from_str(answer.get()).map_err(OpError::internal)?;
    for row in &mut rows {
        let Some(raw) = &row.payload else { continue };
        let mut payload: serde_json::Map<String, Value> = serde_json::from_str(raw.get()).map_err(OpError::internal)?;
        let listed: Vec<String> = payload
            .get("attachments")
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(|i| i.get("storageId")?.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if !listed.is_empty() {
            // The listed attachments only: the bundle and `listMessageAttachments` show the rest.
            let mut records = attachments_of(&ctx.buckets, &row.id).await.map_err(OpError::internal)?;
            records.retain(|r| listed.contains(&r.storage_id));
            apply_attachment_records(&mut payload, &records, |_| None);
        }
        if let Some(extra) = metadata.get(row.id.as_str()) {
            merge_metadata(&mut payload, extra);
        }
        row.payload = Some(serde_json::value::to_raw_value(&payload).map_err(OpError::internal)?);
    }
    serde_json::value::to_raw_value(&rows).map_err(OpError::internal)
}
