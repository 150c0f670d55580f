//! The server certificate and key, read again when their files change: a renewed certificate is
//! served from the next handshake on, without a restart (exporter-toolkit reads them at every
//! handshake; a stat of two files is all this costs per handshake).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug)]
pub(super) struct ReloadingCertificate {
    certificate_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// The files' modification times when last read.
    modified: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

impl ReloadingCertificate {
    /// Reads both files now: at start, a certificate that cannot be served is an error.
    pub(super) fn load(
        certificate_path: PathBuf,
        key_path: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCertificate, String> {
        let modified = modified(&certificate_path, &key_path);
        let key = read(&certificate_path, &key_path, &provider)?;
        Ok(ReloadingCertificate {
            certificate_path,
            key_path,
            provider,
            current: Mutex::new(Loaded { modified, key }),
        })
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let modified = modified(&self.certificate_path, &self.key_path);
        let mut current = self.current.lock().unwrap();
        if modified != current.modified {
            // Recorded even when the read fails, so files caught half-renewed (a new certificate,
            // the old key) are logged once and read again at their next change, not at every
            // handshake; meanwhile the previous pair is served.
            current.modified = modified;
            match read(&self.certificate_path, &self.key_path, &self.provider) {
                Ok(key) => {
                    current.key = key;
                    eprintln!("vsrscope: TLS certificate reloaded");
                }
                Err(error) => {
                    eprintln!(
                        "vsrscope: TLS certificate not reloaded, serving the previous one: {error}"
                    );
                }
            }
        }
        Some(current.key.clone())
    }
}

fn modified(certificate: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let time = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    (time(certificate), time(key))
}

fn read(
    certificate_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let certificates = read_certificates(certificate_path, "cert_file")?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|error| format!("key_file {}: {error}", key_path.display()))?;
    let key = CertifiedKey::from_der(certificates, key, provider)
        .map_err(|error| format!("cert_file and key_file: {error}"))?;
    Ok(Arc::new(key))
}

pub(super) fn read_certificates(
    path: &Path,
    key: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iterator| iterator.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("{key} {}: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{key} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certificates)
}
