//! Where archives go: an object store and a prefix inside it, from a URL.

use crate::ArchiveError;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, ObjectStoreScheme, PutPayload, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// An object store and the prefix the archive lives under.
#[derive(Clone)]
pub struct Destination {
    pub store: Arc<dyn ObjectStore>,
    prefix: String,
    /// The URL as given, for messages and status (URLs carry no credentials here: those come
    /// from the environment).
    pub url: String,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Destination {
    /// Parses `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` (and the
    /// other Azure forms `object_store` knows) or `file:///absolute/path`. Credentials,
    /// region and endpoint come from the provider's usual environment variables (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*`), e.g. `AWS_ENDPOINT` and `AWS_ALLOW_HTTP` for a local S3.
    pub fn open(url_text: &str) -> Result<Destination, ArchiveError> {
        let bad = |detail: String| {
            ArchiveError::InvalidInput(format!("archive URL {url_text:?}: {detail}"))
        };
        let url = url::Url::parse(url_text).map_err(|e| bad(e.to_string()))?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
        // Fail fast enough that a scheduled backup reports an outage instead of hanging: the
        // caller retries the whole run with its own backoff.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        };
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => Arc::new(object_store::local::LocalFileSystem::new()),
            ObjectStoreScheme::AmazonS3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url_text)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url_text)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::MicrosoftAzure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url_text)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            other => {
                return Err(bad(format!(
                    "{other:?} is not supported; use s3://, gs://, az:// or file://"
                )));
            }
        };
        Ok(Destination { store, prefix: prefix.as_ref().to_string(), url: url_text.to_string() })
    }

    /// The full object path of `key` (relative to the archive).
    pub fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The object's bytes, or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
        let path = self.path(key);
        match self.store.get(&path).await {
            Ok(r) => Ok(Some(
                r.bytes().await.map_err(|e| ArchiveError::store("read", &path, e))?.to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ArchiveError::store("read", &path, e)),
        }
    }

    /// The object's size, or `None` if it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, ArchiveError> {
        let path = self.path(key);
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ArchiveError::store("check", &path, e)),
        }
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        let path = self.path(key);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| ArchiveError::store("write", &path, e))?;
        Ok(())
    }

    /// Names (not paths) of the objects directly under `dir`, sorted.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, ArchiveError> {
        let path = self.path(dir);
        let listed = self
            .store
            .list_with_delimiter(Some(&path))
            .await
            .map_err(|e| ArchiveError::store("list", &path, e))?;
        let mut names: Vec<String> = listed
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }
}
