//! Downloading a job's hydrated attachments into the workspace (spec §4.5 step 1).
//!
//! Each `ready` attachment with a download URL lands in
//! `<workspace>/.telegram-attachments/<messageId>/<file>`, where the agent can read it, and yields
//! a line describing it for the prompt. A failed file is reported and does not stop the others.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Directory (relative to the workspace) that holds downloaded attachments.
pub const ATTACHMENTS_DIR: &str = ".telegram-attachments";

const MAX_FILE_NAME_BYTES: usize = 128;
/// An extension longer than this is not kept apart when a name is shortened.
const MAX_KEPT_EXTENSION_BYTES: usize = 16;
const FALLBACK_MIME: &str = "application/octet-stream";

/// An attachment as a hydration bundle carries it (spec §3.5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleAttachment {
    pub kind: String,
    pub status: String,
    pub storage_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_file_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    pub expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
}

/// An attachment written into the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadedAttachment {
    pub storage_id: String,
    pub kind: String,
    /// Where the file is: `<workspace_dir>/.telegram-attachments/<messageId>/<file>`.
    pub path: PathBuf,
    /// The same, relative to the workspace (what the agent sees).
    pub relative_path: PathBuf,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    pub size_bytes: u64,
    /// The bundle's MIME type, else the response's `Content-Type`, else `application/octet-stream`.
    pub mime_type: String,
    /// A line for the prompt, e.g. `photo: .telegram-attachments/<id>/photo-1.jpg (image/jpeg, 1234 bytes)`.
    pub description_line: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("attachment {storage_id}: download failed with HTTP status {status}")]
    Status { storage_id: String, status: reqwest::StatusCode },
    #[error("attachment {storage_id}: larger than the limit of {max_bytes} bytes")]
    TooLarge { storage_id: String, max_bytes: u64 },
    #[error("attachment {storage_id}: download failed: {source}")]
    Http {
        storage_id: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("attachment {storage_id}: {context}: {source}")]
    Io {
        storage_id: String,
        context: String,
        #[source]
        source: io::Error,
    },
}

impl AttachmentError {
    /// The storage id of the attachment that failed.
    pub fn storage_id(&self) -> &str {
        match self {
            Self::Status { storage_id, .. }
            | Self::TooLarge { storage_id, .. }
            | Self::Http { storage_id, .. }
            | Self::Io { storage_id, .. } => storage_id,
        }
    }
}

/// Downloads every `ready` attachment that has a download URL, in order, sending `token` as a
/// bearer token. Returns one result per attempted attachment (others are skipped); files larger
/// than `max_bytes` are refused, and a partial file never stays behind.
pub async fn download_all(
    http: &reqwest::Client,
    token: &str,
    message_id: &str,
    attachments: &[BundleAttachment],
    workspace_dir: &Path,
    max_bytes: u64,
) -> Vec<Result<DownloadedAttachment, AttachmentError>> {
    let dir_name = sanitize_component(message_id).unwrap_or_else(|| "message".to_string());
    let target = Target { workspace_dir, dir_name: &dir_name, max_bytes };
    let mut used_names = HashSet::new();
    let mut results = Vec::new();
    let ready = attachments
        .iter()
        .filter(|a| a.status == "ready")
        .filter_map(|a| a.download_url.as_deref().map(|url| (a, url)));
    for (index, (attachment, url)) in ready.enumerate() {
        let result = download_one(http, token, attachment, url, index + 1, &target, &mut used_names).await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, message_id, "attachment not downloaded");
        }
        results.push(result);
    }
    results
}

struct Target<'a> {
    workspace_dir: &'a Path,
    dir_name: &'a str,
    max_bytes: u64,
}

async fn download_one(
    http: &reqwest::Client,
    token: &str,
    attachment: &BundleAttachment,
    url: &str,
    number: usize,
    target: &Target<'_>,
    used_names: &mut HashSet<String>,
) -> Result<DownloadedAttachment, AttachmentError> {
    let storage_id = &attachment.storage_id;
    let too_large = || AttachmentError::TooLarge { storage_id: storage_id.clone(), max_bytes: target.max_bytes };
    // reqwest errors name the URL, which may be a capability: leave it out of messages.
    let http_error =
        |e: reqwest::Error| AttachmentError::Http { storage_id: storage_id.clone(), source: e.without_url() };
    let io_error = |context: String| {
        move |source: io::Error| AttachmentError::Io { storage_id: storage_id.clone(), context, source }
    };

    if attachment.size_bytes.is_some_and(|size| size > target.max_bytes) {
        return Err(too_large());
    }
    let response = http.get(url).bearer_auth(token).send().await.map_err(http_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(AttachmentError::Status { storage_id: storage_id.clone(), status });
    }
    if response.content_length().is_some_and(|len| len > target.max_bytes) {
        return Err(too_large());
    }

    let mime_type = attachment
        .mime_type
        .as_deref()
        .and_then(normalize_mime)
        .or_else(|| {
            response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(normalize_mime)
        })
        .unwrap_or_else(|| FALLBACK_MIME.to_string());
    let file_name = unique_name(file_name_for(attachment, number, &mime_type), used_names);
    let relative = format!("{ATTACHMENTS_DIR}/{}/{file_name}", target.dir_name);
    let dir = target.workspace_dir.join(ATTACHMENTS_DIR).join(target.dir_name);
    let path = dir.join(&file_name);

    tokio::fs::create_dir_all(&dir).await.map_err(io_error(format!("creating {}", dir.display())))?;
    // Written under a temporary name and renamed, so a reader never sees a partial file; the
    // temporary path deletes itself on every early return.
    let (file, tmp_path) = tempfile::Builder::new()
        .prefix(".part-")
        .tempfile_in(&dir)
        .map_err(io_error(format!("creating a temporary file in {}", dir.display())))?
        .into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut size_bytes: u64 = 0;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(http_error)?;
        size_bytes += chunk.len() as u64;
        if size_bytes > target.max_bytes {
            return Err(too_large());
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io_error(format!("writing {}", path.display())))?;
    }
    file.flush().await.map_err(io_error(format!("writing {}", path.display())))?;
    drop(file);
    tmp_path
        .persist(&path)
        .map_err(|e| e.error)
        .map_err(io_error(format!("moving the download to {}", path.display())))?;

    let description_line = format!("{}: {relative} ({mime_type}, {size_bytes} bytes)", attachment.kind);
    Ok(DownloadedAttachment {
        storage_id: storage_id.clone(),
        kind: attachment.kind.clone(),
        path,
        relative_path: PathBuf::from(relative),
        sha256: hex::encode(hasher.finalize()),
        size_bytes,
        mime_type,
        description_line,
    })
}

/// `type/subtype` lower-cased without parameters; `None` when blank.
fn normalize_mime(raw: &str) -> Option<String> {
    let mime = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    (!mime.is_empty()).then_some(mime)
}

/// The spec §3.6 extension table, read from MIME type to extension.
fn extension_for_mime(mime: &str) -> Option<&'static str> {
    Some(match mime {
        "image/jpeg" => "jpg",
        "image/png" => "png",
        "image/webp" => "webp",
        "video/mp4" => "mp4",
        "audio/mpeg" => "mp3",
        "audio/ogg" => "ogg",
        "application/pdf" => "pdf",
        _ => return None,
    })
}

fn file_name_for(attachment: &BundleAttachment, number: usize, mime: &str) -> String {
    let name = attachment.file_name.as_deref().and_then(sanitize_file_name).unwrap_or_else(|| {
        let kind = sanitize_component(&attachment.kind).unwrap_or_else(|| "file".to_string());
        truncate_name(&format!("{kind}-{number}"), MAX_FILE_NAME_BYTES)
    });
    if has_extension(&name) {
        return name;
    }
    match extension_for_mime(mime) {
        Some(ext) => format!("{}.{ext}", truncate_name(&name, MAX_FILE_NAME_BYTES - ext.len() - 1)),
        None => name,
    }
}

/// Whether `name` ends in something that looks like an extension (`.pdf`, `.jpeg`), rather than
/// just containing a dot (`v1.2 notes`).
fn has_extension(name: &str) -> bool {
    name.rfind('.').is_some_and(|dot| {
        let ext = &name[dot + 1..];
        dot > 0 && !ext.is_empty() && ext.len() <= 10 && ext.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

/// A safe single file name from an untrusted one: its last path segment (either separator),
/// without control characters or characters other systems reserve, without leading dots (no
/// hidden files, no `.`/`..`), at most 128 bytes. `None` when nothing usable remains.
fn sanitize_file_name(raw: &str) -> Option<String> {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|') { '_' } else { c })
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim_start();
    (!cleaned.is_empty()).then(|| truncate_name(cleaned, MAX_FILE_NAME_BYTES))
}

/// A directory or name part from an identifier: ASCII letters, digits, `-` and `_`, anything else
/// becoming `_` (so no separator, no dot, nothing hidden).
fn sanitize_component(raw: &str) -> Option<String> {
    let cleaned: String =
        raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') { c } else { '_' }).collect();
    (!cleaned.is_empty()).then(|| truncate_name(&cleaned, MAX_FILE_NAME_BYTES))
}

/// Cuts `name` to `max` bytes on a character boundary, keeping a short extension.
fn truncate_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let ext = name
        .rfind('.')
        .filter(|&dot| dot > 0 && name.len() - dot <= MAX_KEPT_EXTENSION_BYTES && name.len() - dot < max)
        .map_or("", |dot| &name[dot..]);
    let stem = &name[..name.len() - ext.len()];
    let mut cut = max - ext.len();
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{ext}", &stem[..cut])
}

/// Makes names unique within one message: `report.pdf`, then `report-2.pdf`, `report-3.pdf`…
fn unique_name(name: String, used: &mut HashSet<String>) -> String {
    if used.insert(name.clone()) {
        return name;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(dot) if dot > 0 => (&name[..dot], &name[dot..]),
        _ => (name.as_str(), ""),
    };
    let mut n = 2usize;
    loop {
        let suffix = format!("-{n}{ext}");
        let candidate = format!("{}{suffix}", truncate_name(stem, MAX_FILE_NAME_BYTES.saturating_sub(suffix.len())));
        if used.insert(candidate.clone()) {
            return candidate;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::body::Body;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    use super::*;

    const TOKEN: &str = "secret-token";

    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

    /// Records the request and tells whether it carried the expected bearer token.
    fn record(seen: &Seen, path: &str, headers: &HeaderMap) -> bool {
        let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        let authorised = auth.as_deref() == Some(format!("Bearer {TOKEN}").as_str());
        seen.lock().unwrap().push((path.to_string(), auth));
        authorised
    }

    async fn serve() -> (String, Seen) {
        let seen: Seen = Arc::default();
        let file = |path: &'static str, content_type: &'static str, body: &'static [u8]| {
            let seen = seen.clone();
            get(move |headers: HeaderMap| async move {
                if !record(&seen, path, &headers) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                ([(header::CONTENT_TYPE, content_type)], body).into_response()
            })
        };
        let stream_seen = seen.clone();
        let app = Router::new()
            .route("/photo", file("/photo", "image/jpeg", b"\xff\xd8\xff\xe0jpeg-bytes"))
            .route("/doc", file("/doc", "application/pdf", b"%PDF-1.4 document"))
            .route("/voice", file("/voice", "audio/ogg; codecs=opus", b"OggS voice"))
            .route("/big", file("/big", "application/octet-stream", &[0u8; 4096]))
            .route(
                "/big-stream",
                get(move |headers: HeaderMap| async move {
                    record(&stream_seen, "/big-stream", &headers);
                    // No length is announced, so only the streaming check can stop it.
                    let chunks = (0..8).map(|_| Ok::<_, io::Error>(bytes::Bytes::from_static(&[1u8; 512])));
                    Body::from_stream(futures::stream::iter(chunks))
                }),
            )
            .route("/missing", get(|| async { StatusCode::NOT_FOUND }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (base, seen)
    }

    fn attachment(kind: &str, url: Option<String>) -> BundleAttachment {
        BundleAttachment {
            kind: kind.to_string(),
            status: "ready".to_string(),
            storage_id: format!("st-{kind}"),
            telegram_file_id: Some("tg".to_string()),
            file_name: None,
            mime_type: None,
            size_bytes: None,
            expires_at: 1_700_000_000_000,
            download_url: url,
        }
    }

    fn client() -> reqwest::Client {
        common::telemetry::install_crypto_provider();
        reqwest::Client::builder().build().unwrap()
    }

    #[tokio::test]
    async fn downloads_names_and_isolates_failures() {
        let (base, seen) = serve().await;
        let workspace = tempfile::tempdir().unwrap();
        let url = |p: &str| Some(format!("{base}{p}"));

        let photo = BundleAttachment { mime_type: Some("image/jpeg".into()), ..attachment("photo", url("/photo")) };
        let hostile = BundleAttachment {
            storage_id: "st-hostile".into(),
            file_name: Some("../../etc/passwd".into()),
            mime_type: Some("application/pdf".into()),
            ..attachment("document", url("/doc"))
        };
        let expired = BundleAttachment { status: "expired".into(), ..attachment("video", None) };
        let ready_without_url = attachment("audio", None);
        let missing = attachment("video", url("/missing"));
        let big = attachment("document", url("/big"));
        let big_stream = attachment("audio", url("/big-stream"));
        let announced_big = BundleAttachment { size_bytes: Some(1_000_000), ..attachment("document", url("/doc")) };
        let voice = attachment("voice", url("/voice"));
        let report = |id: &str| BundleAttachment {
            storage_id: id.into(),
            file_name: Some("report.pdf".into()),
            ..attachment("document", url("/doc"))
        };
        let list = vec![
            photo,
            hostile,
            expired,
            ready_without_url,
            missing,
            big,
            big_stream,
            announced_big,
            voice,
            report("st-r1"),
            report("st-r2"),
        ];

        let results = download_all(&client(), TOKEN, "msg/../1", &list, workspace.path(), 1024).await;
        assert_eq!(results.len(), 9, "expired and URL-less attachments are not attempted");

        let dir = workspace.path().join(".telegram-attachments/msg____1");
        let ok = |i: usize| results[i].as_ref().unwrap();

        assert_eq!(ok(0).path, dir.join("photo-1.jpg"));
        assert_eq!(ok(0).relative_path, PathBuf::from(".telegram-attachments/msg____1/photo-1.jpg"));
        assert_eq!(ok(0).description_line, "photo: .telegram-attachments/msg____1/photo-1.jpg (image/jpeg, 14 bytes)");
        assert_eq!(fs_read(&ok(0).path), b"\xff\xd8\xff\xe0jpeg-bytes");
        assert_eq!(ok(0).sha256, hex::encode(Sha256::digest(b"\xff\xd8\xff\xe0jpeg-bytes")));
        assert_eq!(ok(0).size_bytes, 14);

        assert_eq!(ok(1).path, dir.join("passwd.pdf"));
        assert_eq!(ok(1).storage_id, "st-hostile");
        assert_eq!(fs_read(&ok(1).path), b"%PDF-1.4 document");

        match &results[2] {
            Err(e @ AttachmentError::Status { status, .. }) => {
                assert_eq!(*status, reqwest::StatusCode::NOT_FOUND);
                assert!(e.to_string().contains("404"), "{e}");
                assert_eq!(e.storage_id(), "st-video");
            }
            other => panic!("unexpected {other:?}"),
        }
        for i in [3, 4, 5] {
            assert!(matches!(results[i], Err(AttachmentError::TooLarge { max_bytes: 1024, .. })), "{:?}", results[i]);
        }

        assert_eq!(ok(6).path, dir.join("voice-7.ogg"));
        assert_eq!(ok(6).mime_type, "audio/ogg");
        assert_eq!(ok(7).path, dir.join("report.pdf"));
        assert_eq!(ok(8).path, dir.join("report-2.pdf"));
        assert_eq!(ok(8).mime_type, "application/pdf");

        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["passwd.pdf", "photo-1.jpg", "report-2.pdf", "report.pdf", "voice-7.ogg"]);
        assert!(!workspace.path().join("etc").exists());

        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().any(|(p, _)| p == "/big-stream"), "streamed download was attempted");
        assert!(!seen.is_empty());
        for (path, auth) in &seen {
            assert_eq!(auth.as_deref(), Some("Bearer secret-token"), "{path}");
        }
    }

    fn fs_read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn bundle_attachments_deserialize_from_camel_case() {
        let json = r#"[
            {"kind":"photo","status":"ready","storageId":"s1","telegramFileId":"t1","fileName":"a.jpg",
             "mimeType":"image/jpeg","sizeBytes":12,"expiresAt":5,"downloadUrl":"http://x/y"},
            {"kind":"voice","status":"expired","storageId":"s2","expiresAt":6}
        ]"#;
        let parsed: Vec<BundleAttachment> = serde_json::from_str(json).unwrap();
        assert_eq!(parsed[0].storage_id, "s1");
        assert_eq!(parsed[0].download_url.as_deref(), Some("http://x/y"));
        assert_eq!(parsed[0].size_bytes, Some(12));
        assert_eq!(parsed[1].download_url, None);
        assert_eq!(parsed[1].file_name, None);
        let back = serde_json::to_value(&parsed[1]).unwrap();
        assert_eq!(back, serde_json::json!({"kind":"voice","status":"expired","storageId":"s2","expiresAt":6}));
    }

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(sanitize_file_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(sanitize_file_name("..\\..\\boot.ini").as_deref(), Some("boot.ini"));
        assert_eq!(sanitize_file_name("..").as_deref(), None);
        assert_eq!(sanitize_file_name("dir/").as_deref(), None);
        assert_eq!(sanitize_file_name(" .hidden ").as_deref(), Some("hidden"));
        assert_eq!(sanitize_file_name("a\u{0}b\nc\u{7f}.txt").as_deref(), Some("abc.txt"));
        assert_eq!(sanitize_file_name("what?<x>.pdf").as_deref(), Some("what__x_.pdf"));
        assert_eq!(sanitize_file_name("фото.jpg").as_deref(), Some("фото.jpg"));

        let long = format!("{}.pdf", "é".repeat(200));
        let cut = sanitize_file_name(&long).unwrap();
        assert!(cut.len() <= MAX_FILE_NAME_BYTES, "{}", cut.len());
        assert!(cut.ends_with(".pdf"));

        let no_ext = BundleAttachment { file_name: Some("x".repeat(300)), ..attachment("document", None) };
        let name = file_name_for(&no_ext, 1, "application/pdf");
        assert!(name.len() <= MAX_FILE_NAME_BYTES && name.ends_with(".pdf"), "{name}");
        assert_eq!(file_name_for(&attachment("sticker", None), 3, "image/gif"), "sticker-3");
        assert_eq!(file_name_for(&attachment("../..", None), 2, "image/png"), "_____-2.png");
        assert_eq!(sanitize_component("").as_deref(), None);
        assert!(has_extension("a.jpeg"));
        assert!(!has_extension("v1.2 notes"));
        assert!(!has_extension("trailing."));
        assert_eq!(file_name_for(&attachment("document", None), 1, "application/pdf"), "document-1.pdf");
    }
}
