//! `authorizeBlobTransfer`: ingress asks it before it streams an archive or a media file between
//! an HTTP client and an object store. The rules live here, with the data they depend on;
//! ingress only moves bytes.

use common::OpError;
use common::api;
use common::api::snapshots::{BlobKind, BlobMode, BlobTransfer, BlobTransferArgs};
use common::auth::Caller;
use common::ids::{SnapshotId, StorageId};
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::topology::{MEDIA, SNAPSHOT_ARCHIVES};

use crate::{attachments, snapshots};

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::AuthorizeBlobTransfer, _, _, _, _>(ctx, |ctx, caller: Caller, args| async move {
        authorize(&ctx, &caller, args).await
    });
}

async fn authorize(ctx: &ServiceContext, caller: &Caller, args: BlobTransferArgs) -> Result<BlobTransfer, OpError> {
    let id = args.id.as_deref().map(str::trim).filter(|id| !id.is_empty());
    let chunk_bytes = ctx.settings.snapshots.chunk_bytes;
    match (args.kind, args.mode, id) {
        (BlobKind::Snapshot, mode, Some(id)) => {
            // Validated before it names a key or an object (spec §6.1: ids from requests).
            let id = SnapshotId::parse(id)?;
            let record = snapshots::authorize(ctx, caller, &id, mode == BlobMode::Write).await?;
            Ok(BlobTransfer {
                object_store: SNAPSHOT_ARCHIVES.to_string(),
                object_name: record.snapshot_id,
                max_bytes: ctx.settings.snapshots.max_archive_bytes,
                chunk_bytes,
                sha256: record.sha256,
                content_type: Some("application/gzip".to_string()),
            })
        }
        (BlobKind::Media, BlobMode::Write, None) => Ok(BlobTransfer {
            object_store: MEDIA.to_string(),
            object_name: attachments::new_storage_id(),
            max_bytes: ctx.settings.attachments.max_bytes,
            chunk_bytes,
            sha256: None,
            content_type: None,
        }),
        (BlobKind::Media, BlobMode::Read, Some(id)) => {
            let id = StorageId::parse(id)?;
            attachments::authorize_read(ctx, caller, &id).await?;
            Ok(BlobTransfer {
                object_store: MEDIA.to_string(),
                object_name: id.into_string(),
                max_bytes: ctx.settings.attachments.max_bytes,
                chunk_bytes,
                sha256: None,
                content_type: None,
            })
        }
        (BlobKind::Media, BlobMode::Write, Some(_)) => {
            Err(OpError::invalid("a media upload gets a new id; do not pass one"))
        }
        (_, _, None) => Err(OpError::invalid("id is required")),
    }
}
