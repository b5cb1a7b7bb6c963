//! The calls a worker makes, over NATS (request/reply and the object store directly) or over
//! ingress HTTP (`POST /v1/ops/<name>` and the file shim), with the same results either way:
//! the generic [`WorkerClient::call`], and the multi-step procedures built on it — snapshot
//! upload (spec §4.4 "Snapshot procedure") and restore (§4.3 step 6a), the skills manifest and
//! the job's attachments.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, object_store::ObjectMetadata};
use common::OpError;
use common::api::skills::ManifestArgs;
pub use common::api::snapshots::RestoreTarget;
use common::api::snapshots::{
    FailSnapshotArgs, FinalizeSnapshotArgs, PrepareSnapshotArgs, PreparedUpload, RestoreArgs,
};
use common::api::{self, Ignored, Operation};
use common::ids::{AgentKey, ConversationId, WorkerId};
use common::ops::OpClient;
use futures::TryStreamExt;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::archive::{self, ArchiveSummary};

/// Default bound of one operation call over HTTP.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(20);

/// What a worker snapshots of its data directory (format 1, spec §1.7).
pub const SNAPSHOT_ENTRIES: [&str; 2] = [".clawdbot", "workspace"];

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{0}")]
    Op(#[from] OpError),
    #[error("archive: {0}")]
    Archive(#[from] archive::ArchiveError),
    #[error("transfer of {what}: {reason}")]
    Transfer { what: String, reason: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn transfer(what: &str, reason: impl std::fmt::Display) -> KitError {
    KitError::Transfer { what: what.to_string(), reason: reason.to_string() }
}

#[derive(Clone)]
enum Transport {
    /// A worker inside the NATS network: operations by request/reply, files straight to the
    /// object store.
    Nats { ops: OpClient, js: Box<jetstream::Context> },
    /// A worker that only reaches ingress.
    Http { base_url: String, request_timeout: Duration },
}

/// A worker's connection to the control plane, authenticated as one workerId.
#[derive(Clone)]
pub struct WorkerClient {
    worker_id: String,
    token: String,
    transport: Transport,
    http: reqwest::Client,
}

type Prepared = PreparedUpload;

/// Which conversation a snapshot belongs to.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotScope {
    pub workspace_id: String,
    pub agent_key: String,
    pub conversation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedSnapshot {
    pub snapshot_id: String,
    pub sha256: String,
    pub size_bytes: u64,
}

impl WorkerClient {
    /// A client over NATS; `timeout` bounds each request.
    pub fn over_nats(nats: async_nats::Client, worker_id: &str, token: &str, timeout: Duration) -> Self {
        let js = jetstream::new(nats.clone());
        Self::new(worker_id, token, Transport::Nats { ops: OpClient::new(nats, timeout), js: Box::new(js) })
    }

    /// A client over ingress HTTP at `base_url` (e.g. `http://127.0.0.1:8080`); each operation
    /// call may take 20 s (plus a long poll's `waitMs`), see [`WorkerClient::with_request_timeout`].
    pub fn over_http(base_url: &str, worker_id: &str, token: &str) -> Self {
        let base_url = base_url.trim_end_matches('/').to_string();
        Self::new(worker_id, token, Transport::Http { base_url, request_timeout: DEFAULT_HTTP_TIMEOUT })
    }

    /// Bounds each HTTP operation call (a long poll gets its `waitMs` on top). File transfers
    /// are not bounded by it: archives take as long as they take.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        if let Transport::Http { request_timeout, .. } = &mut self.transport {
            *request_timeout = timeout;
        }
        self
    }

    fn new(worker_id: &str, token: &str, transport: Transport) -> Self {
        common::telemetry::install_crypto_provider();
        // No overall timeout: archives take as long as they take; stalls are caught by the
        // connect timeout and the server's own limits.
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build().unwrap_or_default();
        Self { worker_id: worker_id.to_string(), token: token.to_string(), transport, http }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    fn worker(&self) -> Result<WorkerId, OpError> {
        WorkerId::parse(self.worker_id.as_str())
    }

    /// The HTTP client (with nothing configured but timeouts) used for downloads.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Calls operation `O` as this worker.
    pub async fn call<O: Operation>(&self, args: &O::Args) -> Result<O::Output, OpError> {
        match &self.transport {
            Transport::Nats { ops, .. } => ops.call::<O>(&self.token, args).await,
            Transport::Http { base_url, request_timeout } => {
                let op = O::SPEC.name;
                let body = serde_json::to_vec(args).map_err(|e| OpError::invalid(e.to_string()))?;
                let wait = common::api::request_wait(&O::SPEC, &body);
                let mut request = self
                    .http
                    .post(format!("{base_url}/v1/ops/{op}"))
                    .timeout(*request_timeout + wait)
                    .bearer_auth(&self.token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json");
                // The call joins the trace of the job being processed, if spans are exported.
                if let Some(traceparent) = common::telemetry::current_traceparent() {
                    request = request.header("traceparent", traceparent);
                }
                let response = request
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| OpError::unavailable(format!("'{op}' over HTTP: {e}")))?;
                let status = response.status().as_u16();
                let body =
                    response.bytes().await.map_err(|e| OpError::unavailable(format!("'{op}' over HTTP: {e}")))?;
                common::ops::decode_reply(status, &body)
            }
        }
    }

    /// Archives `data_dir` and uploads it as a snapshot of `scope`: prepare, pack, upload,
    /// finalize (the server re-hashes the stored archive). Any failure after prepare is reported
    /// with `failDataSnapshotUpload`, so the snapshot never stays `uploading`.
    pub async fn upload_snapshot(
        &self,
        data_dir: &Path,
        scope: &SnapshotScope,
        reason: &str,
    ) -> Result<UploadedSnapshot, KitError> {
        let reason = serde_json::from_value(serde_json::Value::from(reason))
            .map_err(|_| OpError::invalid(format!("unknown snapshot reason '{reason}'")))?;
        let args = PrepareSnapshotArgs {
            worker_id: self.worker()?,
            workspace_id: Some(scope.workspace_id.clone()),
            agent_key: AgentKey::parse(scope.agent_key.as_str())?,
            conversation_id: Some(ConversationId::parse(scope.conversation_id.as_str())?),
            reason,
            now_ms: Ignored,
        };
        let prepared = self.call::<api::PrepareDataSnapshotUpload>(&args).await?;
        let result = self.pack_and_upload(data_dir, &prepared).await;
        match result {
            Ok(summary) => {
                let args = FinalizeSnapshotArgs {
                    worker_id: self.worker()?,
                    snapshot_id: prepared.snapshot_id.clone(),
                    storage_id: None,
                    sha256: summary.sha256.clone(),
                    size_bytes: summary.size_bytes,
                    now_ms: Ignored,
                };
                let finalized = self.call::<api::FinalizeDataSnapshotUpload>(&args).await?;
                if !finalized {
                    return Err(transfer("snapshot", "finalize was refused (unknown snapshot or another worker's)"));
                }
                Ok(UploadedSnapshot {
                    snapshot_id: prepared.snapshot_id.into_string(),
                    sha256: summary.sha256,
                    size_bytes: summary.size_bytes,
                })
            }
            Err(e) => {
                let args = FailSnapshotArgs {
                    worker_id: self.worker()?,
                    snapshot_id: prepared.snapshot_id,
                    error: e.to_string(),
                    now_ms: Ignored,
                };
                if let Err(report) = self.call::<api::FailDataSnapshotUpload>(&args).await {
                    tracing::warn!(error = %report, "could not report the failed snapshot upload");
                }
                Err(e)
            }
        }
    }

    async fn pack_and_upload(&self, data_dir: &Path, prepared: &Prepared) -> Result<ArchiveSummary, KitError> {
        let dir = tempfile::tempdir()?;
        let archive_path = dir.path().join("snapshot.tar.gz");
        let (src, out) = (data_dir.to_path_buf(), archive_path.clone());
        let summary = tokio::task::spawn_blocking(move || archive::pack(&src, &SNAPSHOT_ENTRIES, &out))
            .await
            .map_err(|e| transfer("snapshot", format!("packing task failed: {e}")))??;
        if summary.size_bytes > prepared.max_bytes {
            return Err(transfer(
                "snapshot",
                format!("archive of {} bytes exceeds the limit of {} bytes", summary.size_bytes, prepared.max_bytes),
            ));
        }
        match &self.transport {
            Transport::Nats { js, .. } => {
                let store = js.get_object_store(&prepared.object_store).await.map_err(|e| transfer("snapshot", e))?;
                let mut file = tokio::fs::File::open(&archive_path).await?;
                let meta = ObjectMetadata {
                    name: prepared.object_name.clone(),
                    chunk_size: Some(prepared.chunk_bytes),
                    ..Default::default()
                };
                store.put(meta, &mut file).await.map_err(|e| transfer("snapshot", e))?;
            }
            Transport::Http { .. } => {
                let file = tokio::fs::File::open(&archive_path).await?;
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                let response = self
                    .http
                    .put(&prepared.upload_url)
                    .bearer_auth(&self.token)
                    .header(reqwest::header::CONTENT_TYPE, "application/gzip")
                    .header(reqwest::header::CONTENT_LENGTH, summary.size_bytes)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| transfer("snapshot", e))?;
                if !response.status().is_success() {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    return Err(transfer("snapshot", format!("upload answered {status}: {text}")));
                }
            }
        }
        Ok(summary)
    }

    /// Looks up the newest ready snapshot of `scope` and restores it into `data_dir`, checking
    /// its sha256 before anything is written. `None` when there is nothing to restore.
    pub async fn restore_snapshot(
        &self,
        scope: &SnapshotScope,
        data_dir: &Path,
    ) -> Result<Option<(RestoreTarget, ArchiveSummary)>, KitError> {
        let args = RestoreArgs {
            workspace_id: Some(scope.workspace_id.clone()),
            agent_key: AgentKey::parse(scope.agent_key.as_str())?,
            conversation_id: Some(ConversationId::parse(scope.conversation_id.as_str())?),
            now_ms: Ignored,
        };
        let target = self.call::<api::GetLatestDataSnapshotForRestore>(&args).await?;
        let Some(target) = target else { return Ok(None) };
        let dir = tempfile::tempdir()?;
        let archive_path = dir.path().join("snapshot.tar.gz");
        self.download(&target.object_store, &target.object_name, &target.download_url, &archive_path).await?;
        let (src, dest, sha) = (archive_path, data_dir.to_path_buf(), target.sha256.clone());
        let summary = tokio::task::spawn_blocking(move || archive::unpack(&src, sha.as_deref(), &dest))
            .await
            .map_err(|e| transfer("snapshot", format!("unpacking task failed: {e}")))??;
        Ok(Some((target, summary)))
    }

    /// Fetches a stored file into `out`: from the object store over NATS, else from `url`.
    async fn download(&self, store: &str, name: &str, url: &str, out: &Path) -> Result<(), KitError> {
        let mut file = tokio::fs::File::create(out).await?;
        match &self.transport {
            Transport::Nats { js, .. } => {
                let store = js.get_object_store(store).await.map_err(|e| transfer(name, e))?;
                let mut object = store.get(name).await.map_err(|e| transfer(name, e))?;
                tokio::io::copy(&mut object, &mut file).await?;
            }
            Transport::Http { .. } => {
                let response =
                    self.http.get(url).bearer_auth(&self.token).send().await.map_err(|e| transfer(name, e))?;
                if !response.status().is_success() {
                    let status = response.status();
                    return Err(transfer(name, format!("download answered {status}")));
                }
                let mut body = response.bytes_stream();
                while let Some(chunk) = body.try_next().await.map_err(|e| transfer(name, e))? {
                    file.write_all(&chunk).await?;
                }
            }
        }
        file.sync_all().await?;
        Ok(())
    }

    /// The global skills manifest of a release channel (`stable` when `None`).
    pub async fn skills_manifest(
        &self,
        workspace_id: &str,
        release_channel: Option<&str>,
    ) -> Result<common::skills::SkillsManifest, OpError> {
        let release_channel = release_channel
            .map(|c| serde_json::from_value(serde_json::Value::from(c)))
            .transpose()
            .map_err(|_| OpError::invalid(format!("unknown release channel {release_channel:?}")))?;
        let args = ManifestArgs {
            workspace_id: Some(workspace_id.to_string()),
            worker_id: Some(self.worker()?),
            release_channel,
        };
        self.call::<api::GetWorkerGlobalSkillsManifest>(&args).await
    }
}
