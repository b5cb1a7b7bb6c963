//! `authorizeBlobTransfer`: ingress asks it before it streams an archive or a media file between
//! an HTTP client and an object store. The rules live here, with the data they depend on;
//! ingress only moves bytes.

use common::OpError;
use common::auth::Caller;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::topology::{MEDIA, SNAPSHOT_ARCHIVES};
use serde::{Deserialize, Serialize};

use crate::{attachments, snapshots};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BlobKind {
    Snapshot,
    Media,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Read,
    Write,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TransferArgs {
    kind: BlobKind,
    mode: Mode,
    /// The snapshot id or storage id; absent for a media upload, which gets a new id.
    id: Option<String>,
}

/// What ingress may do: which object of which store, and how many bytes at most.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transfer {
    pub object_store: String,
    pub object_name: String,
    pub max_bytes: u64,
    pub chunk_bytes: usize,
    /// For a snapshot download: the sha256 the archive must have.
    pub sha256: Option<String>,
    pub content_type: Option<String>,
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.register_with(ctx, "authorizeBlobTransfer", |ctx, caller: Caller, args: TransferArgs| async move {
        authorize(&ctx, &caller, args).await
    });
}

async fn authorize(ctx: &ServiceContext, caller: &Caller, args: TransferArgs) -> Result<Transfer, OpError> {
    let id = args.id.as_deref().map(str::trim).filter(|id| !id.is_empty());
    let chunk_bytes = ctx.settings.snapshots.chunk_bytes;
    match (args.kind, args.mode, id) {
        (BlobKind::Snapshot, mode, Some(id)) => {
            let record = snapshots::authorize(ctx, caller, id, mode == Mode::Write).await?;
            Ok(Transfer {
                object_store: SNAPSHOT_ARCHIVES.to_string(),
                object_name: record.snapshot_id,
                max_bytes: ctx.settings.snapshots.max_archive_bytes,
                chunk_bytes,
                sha256: record.sha256,
                content_type: Some("application/gzip".to_string()),
            })
        }
        (BlobKind::Media, Mode::Write, None) => Ok(Transfer {
            object_store: MEDIA.to_string(),
            object_name: attachments::new_storage_id(),
            max_bytes: ctx.settings.attachments.max_bytes,
            chunk_bytes,
            sha256: None,
            content_type: None,
        }),
        (BlobKind::Media, Mode::Read, Some(id)) => {
            attachments::authorize_read(ctx, caller, id).await?;
            Ok(Transfer {
                object_store: MEDIA.to_string(),
                object_name: id.to_string(),
                max_bytes: ctx.settings.attachments.max_bytes,
                chunk_bytes,
                sha256: None,
                content_type: None,
            })
        }
        (BlobKind::Media, Mode::Write, Some(_)) => {
            Err(OpError::invalid("a media upload gets a new id; do not pass one"))
        }
        (_, _, None) => Err(OpError::invalid("id is required")),
    }
}
