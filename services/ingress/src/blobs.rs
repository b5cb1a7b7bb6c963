//! The file shim: workers and apps that speak only HTTP move snapshot archives and media files
//! through ingress, streamed chunk by chunk between the connection and the object store — an
//! archive is never held in memory whole.
//!
//! - `PUT /v1/snapshots/{id}/archive` — upload a prepared snapshot's archive;
//! - `GET /v1/snapshots/{id}/archive` — download a ready snapshot's archive;
//! - `POST /v1/media` — upload a media file, answered with its `storageId`;
//! - `GET /v1/media/{storageId}` — download an attachment.
//!
//! Who may move which file is decided by hydration (`authorizeBlobTransfer`, called with the
//! caller's own credentials); ingress only moves the bytes and enforces the size it was given.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_nats::jetstream::object_store::{GetErrorKind, ObjectMetadata, ObjectStore};
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use common::api;
use common::api::snapshots::{BlobKind, BlobMode, BlobTransfer, BlobTransferArgs};
use common::ids::{SnapshotId, StorageId};
use common::service::ServiceContext;
use common::{ErrorCode, OpError};
use futures::TryStreamExt;
use serde_json::json;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::{authorization, declared_length, error_response, json_response};

/// Asks hydration what the caller (`auth`: its Authorization header) may do, and opens the
/// object store it names.
async fn authorize(
    ctx: &ServiceContext,
    auth: String,
    args: BlobTransferArgs,
) -> Result<(BlobTransfer, &ObjectStore), OpError> {
    let transfer = ctx.ops.call_as::<api::AuthorizeBlobTransfer>(&auth, &args).await?;
    let store = match transfer.object_store.as_str() {
        common::topology::SNAPSHOT_ARCHIVES => &ctx.buckets.snapshot_archives,
        common::topology::MEDIA => &ctx.buckets.media,
        other => return Err(OpError::internal(format!("unknown object store '{other}'"))),
    };
    Ok((transfer, store))
}

/// The transfer of one stored file named in the path, checked by its kind's id rule before
/// anything else, so a hostile path never reaches a store or a subject.
fn transfer_of(
    kind: BlobKind,
    mode: BlobMode,
    id: Result<Path<String>, PathRejection>,
) -> Result<BlobTransferArgs, OpError> {
    let Path(id) = id.map_err(|e| OpError::invalid(format!("invalid path: {}", e.body_text())))?;
    let id = match kind {
        BlobKind::Snapshot => SnapshotId::parse(id)?.into_string(),
        BlobKind::Media => StorageId::parse(id)?.into_string(),
    };
    Ok(BlobTransferArgs { kind, mode, id: Some(id) })
}

pub(crate) async fn put_snapshot(
    State(ctx): State<ServiceContext>,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let started = std::time::Instant::now();
    let respond = |info: (String, u64, String)| {
        metrics::histogram!(common::telemetry::SNAPSHOT_BYTES).record(info.1 as f64);
        json!({"snapshotId": info.0, "sizeBytes": info.1, "sha256": info.2})
    };
    let result = match transfer_of(BlobKind::Snapshot, BlobMode::Write, id) {
        Ok(args) => upload(&ctx, request, args, respond).await,
        Err(e) => Err(e),
    };
    if result.as_ref().is_ok_and(|r| r.status().is_success()) {
        metrics::histogram!(common::telemetry::SNAPSHOT_DURATION).record(started.elapsed().as_secs_f64());
    }
    result.unwrap_or_else(|e| error_response(&e))
}

pub(crate) async fn post_media(State(ctx): State<ServiceContext>, request: Request) -> Response {
    let args = BlobTransferArgs { kind: BlobKind::Media, mode: BlobMode::Write, id: None };
    let mime = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    upload(
        &ctx,
        request,
        args,
        move |info| json!({"storageId": info.0, "sizeBytes": info.1, "sha256": info.2, "mimeType": mime}),
    )
    .await
    .unwrap_or_else(|e| error_response(&e))
}

pub(crate) async fn get_snapshot(
    State(ctx): State<ServiceContext>,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let result = match transfer_of(BlobKind::Snapshot, BlobMode::Read, id) {
        Ok(args) => download(&ctx, request, args).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

pub(crate) async fn get_media(
    State(ctx): State<ServiceContext>,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let result = match transfer_of(BlobKind::Media, BlobMode::Read, id) {
        Ok(args) => download(&ctx, request, args).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

/// Streams the request body into the authorised object and answers with `respond(name, size,
/// sha256 hex)`.
async fn upload(
    ctx: &ServiceContext,
    request: Request,
    args: BlobTransferArgs,
    respond: impl FnOnce((String, u64, String)) -> serde_json::Value,
) -> Result<Response, OpError> {
    let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    if content_type.as_ref().is_some_and(|ct| ct.len() > MAX_CONTENT_TYPE_BYTES) {
        return Err(OpError::invalid(format!("Content-Type is longer than {MAX_CONTENT_TYPE_BYTES} bytes")));
    }
    if declared_length(request.headers()) == Some(0) {
        return Err(empty_file());
    }
    let (transfer, store) = authorize(ctx, authorization(request.headers())?, args).await?;
    if declared_length(request.headers()).is_some_and(|len| len > transfer.max_bytes) {
        return Err(too_large(transfer.max_bytes));
    }
    let body = request.into_body().into_data_stream().map_err(std::io::Error::other);
    let mut reader = Limited { inner: StreamReader::new(body), remaining: transfer.max_bytes, exceeded: false };
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("uploadedAt".to_string(), ctx.clock.now_ms().to_string());
    if let Some(ct) = content_type.or(transfer.content_type) {
        metadata.insert("contentType".to_string(), ct);
    }
    let meta = ObjectMetadata {
        name: transfer.object_name.clone(),
        chunk_size: Some(transfer.chunk_bytes),
        metadata,
        ..Default::default()
    };
    match store.put(meta, &mut reader).await {
        Ok(info) if info.size == 0 => {
            // A streamed body without a length can still turn out empty.
            if let Err(e) = store.delete(&info.name).await {
                tracing::warn!(error = %e, "could not delete an empty upload");
            }
            Err(empty_file())
        }
        Ok(info) => {
            let sha = info.digest.as_deref().and_then(digest_hex).unwrap_or_default();
            let body = respond((info.name, info.size as u64, sha));
            Ok(json_response(StatusCode::OK, Bytes::from(serde_json::to_vec(&body).unwrap_or_default())))
        }
        Err(_) if reader.exceeded => Err(too_large(transfer.max_bytes)),
        Err(e) => Err(OpError::unavailable(format!("upload interrupted: {e}"))),
    }
}

/// The longest `Content-Type` kept with a stored file (RFC 6838 limits a media type to 127
/// characters per part).
const MAX_CONTENT_TYPE_BYTES: usize = 255;

fn empty_file() -> OpError {
    OpError::invalid("the file is empty")
}

/// Streams the authorised object to the client.
async fn download(ctx: &ServiceContext, request: Request, args: BlobTransferArgs) -> Result<Response, OpError> {
    let (transfer, store) = authorize(ctx, authorization(request.headers())?, args).await?;
    let object = match store.get(&transfer.object_name).await {
        Ok(o) => o,
        Err(e) if e.kind() == GetErrorKind::NotFound => {
            return Err(OpError::not_found(format!("no stored file '{}'", transfer.object_name)));
        }
        Err(e) => return Err(OpError::unavailable(format!("object store: {e}"))),
    };
    let info = object.info().clone();
    let content_type = info
        .metadata
        .get("contentType")
        .cloned()
        .or(transfer.content_type)
        .unwrap_or_else(|| "application/octet-stream".to_string());
    let mut response = Body::from_stream(ReaderStream::with_capacity(object, 256 * 1024)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size as u64));
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    // The object store verifies the digest while reading; a client can check it too.
    let sha = transfer.sha256.or_else(|| info.digest.as_deref().and_then(digest_hex));
    if let Some(v) = sha.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert("x-af-sha256", v);
    }
    Ok(response)
}

/// `SHA-256=<base64url>` (the object store's digest) as lowercase hex.
fn digest_hex(digest: &str) -> Option<String> {
    let b64 = digest.strip_prefix("SHA-256=")?;
    let bytes = base64::engine::general_purpose::URL_SAFE.decode(b64).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn too_large(max: u64) -> OpError {
    OpError::new(ErrorCode::PayloadTooLarge, format!("the file exceeds the limit of {max} bytes"))
}

/// A reader that fails once more than `remaining` bytes have passed, so an upload that lied
/// about (or did not declare) its length stops at the limit.
struct Limited<R> {
    inner: R,
    remaining: u64,
    exceeded: bool,
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let read = (buf.filled().len() - before) as u64;
            if read > self.remaining {
                // A failed read must not hand out data (AsyncRead's contract).
                buf.set_filled(before);
                self.exceeded = true;
                return Poll::Ready(Err(std::io::Error::other("upload exceeds its size limit")));
            }
            self.remaining -= read;
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_store_digests_become_hex() {
        // sha256("") in the object store's notation.
        let digest = "SHA-256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU=";
        assert_eq!(
            digest_hex(digest).as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert_eq!(digest_hex("MD5=x"), None);
    }

    #[tokio::test]
    async fn the_limit_stops_a_long_body() {
        use tokio::io::AsyncReadExt;
        let mut ok = Limited { inner: &b"12345"[..], remaining: 5, exceeded: false };
        let mut out = Vec::new();
        ok.read_to_end(&mut out).await.expect("within the limit");
        let mut long = Limited { inner: &b"123456"[..], remaining: 5, exceeded: false };
        assert!(long.read_to_end(&mut Vec::new()).await.is_err());
        assert!(long.exceeded);
    }
}
