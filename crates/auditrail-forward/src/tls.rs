//! One rustls client configuration for both forwarders: the ring provider, TLS 1.2 and 1.3,
//! the CA file's certificates (or the system's roots) and an optional client certificate.

use crate::ForwardError;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ForwardError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ForwardError::file(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ForwardError::file(path, e))?;
    if certs.is_empty() {
        return Err(ForwardError::file(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The client configuration. `ca_file` replaces the system's roots when given.
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, ForwardError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| ForwardError::file(path, e))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(ForwardError::File {
                    path: "(the system's CA certificates)".into(),
                    message: "none found; set ca_file".into(),
                });
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ForwardError::Unavailable(format!("TLS setup: {e}")))?
    .with_root_certificates(roots);
    match client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = certificates(cert)?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| ForwardError::file(key, e))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| ForwardError::file(cert, e))
        }
    }
}
