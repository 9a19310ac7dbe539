//! Models from the Hugging Face hub: `pull` resolves `ORG/NAME[@REV]` in the standard Hugging
//! Face cache — downloading with the `hf-hub` crate when built with the `hub` feature — and
//! verifies every file it returns against the content hash the cache names its blob by
//! ([`crate::export`] writes the model folders).
//!
//! The cache layout (the one `huggingface_hub` and `hf-hub` write):
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
//! └── models--ORG--NAME/
//!     ├── refs/main                      the commit hash the revision points at
//!     ├── blobs/<sha256 or git-sha1>     the file contents, named by their hash
//!     └── snapshots/<commit>/<file>      symbolic links into blobs/
//! ```
//!
//! Blobs of large (LFS) files are named by the SHA-256 of their content, the others by their git
//! blob SHA-1 (`sha1("blob <len>\0" + content)`); both are checked on every read.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The files a cwseg model folder holds; the first two are needed to predict.
pub const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "README.md"];

/// A model on the hub: `ORG/NAME` at a revision (branch, tag or commit; default `main`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// Owner.
    pub org: String,
    /// Repository name.
    pub name: String,
    /// Branch, tag or 40-hex commit.
    pub revision: String,
}

impl FromStr for HubRef {
    type Err = anyhow::Error;

    /// `ORG/NAME`, `ORG/NAME@REV`, with or without `hf://`.
    fn from_str(text: &str) -> Result<Self> {
        let bare = text.strip_prefix("hf://").unwrap_or(text);
        let (repo, revision) = match bare.split_once('@') {
            Some((r, rev)) => (r, rev.to_string()),
            None => (bare, "main".to_string()),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if parts.len() != 2 || !parts.iter().all(|p| valid(p)) {
            bail!("`{text}`: expected ORG/NAME or ORG/NAME@REVISION (letters, digits, - _ .)");
        }
        if revision.is_empty() || revision.contains("..") || revision.starts_with('/') {
            bail!("`{text}`: invalid revision `{revision}`");
        }
        Ok(HubRef {
            org: parts[0].to_string(),
            name: parts[1].to_string(),
            revision,
        })
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.org, self.name, self.revision)
    }
}

/// The hub cache folder, resolved from the environment as `huggingface_hub` does.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    let home = env("HF_HOME").unwrap_or_else(|| {
        env("XDG_CACHE_HOME")
            .or_else(|| env("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("huggingface")
    });
    home.join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

fn repo_folder(cache: &Path, model: &HubRef) -> PathBuf {
    cache.join(format!("models--{}--{}", model.org, model.name))
}

/// The commit a revision points at in the cache (`refs/REV`), or the revision itself when it
/// is a commit hash.
fn cached_commit(cache: &Path, model: &HubRef) -> Result<Option<String>> {
    if is_commit(&model.revision) {
        return Ok(Some(model.revision.clone()));
    }
    let path = repo_folder(cache, model).join("refs").join(&model.revision);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let commit = text.trim().to_string();
            if !is_commit(&commit) {
                bail!("{}: not a commit hash: `{commit}`", path.display());
            }
            Ok(Some(commit))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Checks a cached file against the hash its blob is named by. Returns the hash kind checked.
pub fn verify(path: &Path) -> Result<&'static str> {
    let blob = fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let name = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let in_blobs = blob
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|p| p == "blobs");
    if !in_blobs || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "{}: not a link into the cache's blobs/ folder (resolves to {}); cannot verify it",
            path.display(),
            blob.display()
        );
    }
    let bytes = fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
    let (kind, digest) = match name.len() {
        64 => ("sha256", hex(&Sha256::digest(&bytes))),
        40 => {
            let mut hasher = Sha1::new();
            hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
            hasher.update(&bytes);
            ("git-sha1", hex(&hasher.finalize()))
        }
        _ => bail!(
            "{}: blob name `{name}` is neither a SHA-256 nor a git SHA-1",
            blob.display()
        ),
    };
    if digest != name.to_ascii_lowercase() {
        bail!(
            "{}: corrupt download: its {kind} is {digest}, the cache names it {name}; delete it and pull again",
            path.display()
        );
    }
    Ok(kind)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Resolves a model in the cache (downloading it first when online and built with the `hub`
/// feature), verifies its files and returns the snapshot folder holding them.
pub fn pull(model: &HubRef, offline: bool) -> Result<PathBuf> {
    let cache = cache_dir();
    if !offline {
        download(model, &cache)?;
    }
    let commit = cached_commit(&cache, model)?.with_context(|| {
        format!(
            "{model} is not in the Hugging Face cache {}{}",
            cache.display(),
            if offline {
                " (offline: HF_HUB_OFFLINE is set or --offline given)"
            } else {
                ""
            }
        )
    })?;
    let snapshot = repo_folder(&cache, model).join("snapshots").join(&commit);
    for file in &MODEL_FILES[..2] {
        let path = snapshot.join(file);
        if !path.exists() {
            bail!(
                "{model}: {} is missing from the cache (commit {commit}){}",
                path.display(),
                if offline {
                    "; pull it while online first"
                } else {
                    ""
                }
            );
        }
        verify(&path)?;
    }
    let readme = snapshot.join(MODEL_FILES[2]);
    if readme.exists() {
        verify(&readme)?;
    }
    Ok(snapshot)
}

#[cfg(feature = "hub")]
fn download(model: &HubRef, cache: &Path) -> Result<()> {
    let client = hf_hub::HFClientSync::new().context("starting the Hugging Face client")?;
    let repo = client.model(&model.org, &model.name);
    for file in MODEL_FILES {
        let result = repo
            .download_file()
            .filename(file)
            .revision(model.revision.clone())
            .send();
        match result {
            Ok(path) => tracing::info!(file, path = %path.display(), "downloaded"),
            // the model card is optional
            Err(e) if file == "README.md" => tracing::warn!("{model}: no README.md ({e})"),
            Err(e) => {
                return Err(anyhow::anyhow!(e)).with_context(|| {
                    format!("downloading {file} of {model} into {}", cache.display())
                });
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "hub"))]
fn download(model: &HubRef, cache: &Path) -> Result<()> {
    // Without the client, a model already in the cache is used as it is.
    if cached_commit(cache, model)?.is_none() {
        bail!(
            "{model} is not in the Hugging Face cache {} and this cwseg was built without downloads; \
             rebuild with `--features hub`, or fetch it with `huggingface-cli download {}/{}`",
            cache.display(),
            model.org,
            model.name
        );
    }
    Ok(())
}

/// A `--model` argument: `hf://ORG/NAME[@REV]` is pulled (offline with `HF_HUB_OFFLINE`), a
/// path is returned as it is.
pub fn model_path(arg: &Path) -> Result<PathBuf> {
    match arg.to_str().filter(|s| s.starts_with("hf://")) {
        Some(text) => pull(&text.parse()?, offline_from_env()),
        None => Ok(arg.to_path_buf()),
    }
}
