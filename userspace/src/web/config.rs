//! `--web.config.file`: the YAML file of Prometheus exporters (exporter-toolkit) — a TLS
//! certificate and key, optionally verified client certificates, and basic-auth users with
//! bcrypt hashes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;

use super::certificate::{ReloadingCertificate, read_certificates};

#[derive(Debug, thiserror::Error)]
#[error("--web.config.file {}: {reason}", path.display())]
pub struct WebConfigError {
    path: PathBuf,
    reason: String,
}

/// What the endpoint serves with: TLS if configured, basic auth if users are listed.
#[derive(Debug, Default)]
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// User name to bcrypt hash.
    pub users: BTreeMap<String, String>,
}

/// The file as exporter-toolkit defines it; keys vsrscope does not implement are refused, never
/// ignored, so a setting an operator relies on cannot silently do nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    #[serde(default)]
    cert_file: String,
    #[serde(default)]
    key_file: String,
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: String,
    min_version: Option<String>,
    max_version: Option<String>,
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let fail = |reason: String| WebConfigError {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|error| fail(error.to_string()))?;
        // An empty file is a valid configuration with nothing in it, as in exporter-toolkit.
        let file: Option<File> =
            serde_yaml::from_str(&text).map_err(|error| fail(error.to_string()))?;
        let Some(file) = file else {
            return Ok(WebConfig::default());
        };
        for (user, hash) in &file.basic_auth_users {
            if user.contains(':') {
                return Err(fail(format!(
                    "basic_auth_users: {user:?} contains ':', which basic auth cannot carry"
                )));
            }
            hash.parse::<bcrypt::HashParts>().map_err(|error| {
                fail(format!(
                    "basic_auth_users: {user}: not a bcrypt hash ({error})"
                ))
            })?;
        }
        // Relative paths are relative to the file, as exporter-toolkit resolves them.
        let directory = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(tls) => tls_config(&tls, directory).map_err(fail)?,
            None => None,
        };
        Ok(WebConfig {
            tls,
            users: file.basic_auth_users,
        })
    }
}

/// The rustls server configuration, or `None` when neither file is named (plain HTTP).
fn tls_config(
    file: &TlsFile,
    directory: &Path,
) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let versions = protocol_versions(file.min_version.as_deref(), file.max_version.as_deref())?;
    let (certificate_path, key_path) = match (file.cert_file.as_str(), file.key_file.as_str()) {
        ("", "") if file.client_auth_type.is_none() && file.client_ca_file.is_empty() => {
            return Ok(None);
        }
        ("", "") => {
            return Err(
                "tls_server_config: client certificates need cert_file and key_file".into(),
            );
        }
        ("", _) => return Err("tls_server_config: key_file without cert_file".into()),
        (_, "") => return Err("tls_server_config: cert_file without key_file".into()),
        (certificate, key) => (directory.join(certificate), directory.join(key)),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificate = ReloadingCertificate::load(certificate_path, key_path, provider.clone())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|error| error.to_string())?;
    let client_ca = || -> Result<Arc<rustls::RootCertStore>, String> {
        if file.client_ca_file.is_empty() {
            return Err("tls_server_config: client_auth_type verifies client certificates: give client_ca_file".into());
        }
        let mut roots = rustls::RootCertStore::empty();
        for certificate in
            read_certificates(&directory.join(&file.client_ca_file), "client_ca_file")?
        {
            roots
                .add(certificate)
                .map_err(|error| format!("client_ca_file: {error}"))?;
        }
        Ok(Arc::new(roots))
    };
    let builder = match file.client_auth_type.as_deref().unwrap_or("NoClientCert") {
        "NoClientCert" => builder.with_no_client_auth(),
        kind @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven") => {
            let verifier = WebPkiClientVerifier::builder_with_provider(client_ca()?, provider);
            let verifier = if kind == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|error| error.to_string())?)
        }
        other => {
            return Err(format!(
                "tls_server_config: client_auth_type {other:?} is not supported (NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert)"
            ));
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(certificate));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The TLS versions from `min_version` (default TLS12, as exporter-toolkit) to `max_version`.
fn protocol_versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let rank = |name: &str, key: &str| match name {
        "TLS12" => Ok(0),
        "TLS13" => Ok(1),
        other => Err(format!(
            "tls_server_config: {key} {other:?}: vsrscope supports TLS12 and TLS13"
        )),
    };
    let low = rank(min.unwrap_or("TLS12"), "min_version")?;
    let high = rank(max.unwrap_or("TLS13"), "max_version")?;
    if low > high {
        return Err("tls_server_config: min_version is above max_version".into());
    }
    Ok([&rustls::version::TLS12, &rustls::version::TLS13][low..=high].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<WebConfig, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let index = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "vsrscope-web-config-{}-{index}.yml",
            std::process::id()
        ));
        std::fs::write(&path, yaml).unwrap();
        let config = WebConfig::load(&path).map_err(|error| error.to_string());
        std::fs::remove_file(&path).unwrap();
        config
    }

    // A well-formed hash (cost 4); what it hashes does not matter here.
    const HASH: &str = "$2b$04$D0AaTzF8E4Jv7w5Kx2N9Iu0gAIRrR5mFhXFDLqPG1jG3sK9N6bFxW";

    #[test]
    fn users_and_no_tls_is_plain_http_with_basic_auth() {
        let config = load(&format!("basic_auth_users:\n  prometheus: {HASH}\n")).unwrap();
        assert!(config.tls.is_none());
        assert_eq!(config.users["prometheus"], HASH);
        let empty = load("").unwrap();
        assert!(empty.tls.is_none() && empty.users.is_empty());
        let no_files = load("tls_server_config:\n  min_version: TLS13\n").unwrap();
        assert!(no_files.tls.is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (yaml, reason) in [
            (
                "basic_auth_users:\n  u: plaintext\n",
                "u: not a bcrypt hash",
            ),
            (
                "tls_server_config:\n  cert_file: c.pem\n",
                "cert_file without key_file",
            ),
            (
                "tls_server_config:\n  key_file: k.pem\n",
                "key_file without cert_file",
            ),
            (
                "tls_server_config:\n  cert_file: /nonexistent/c.pem\n  key_file: k.pem\n",
                "cert_file /nonexistent/c.pem",
            ),
            (
                "tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
                "unknown field `cipher_suites`",
            ),
            (
                "http_server_config:\n  http2: false\n",
                "unknown field `http_server_config`",
            ),
            ("basic_auth_users: [a, b]\n", "basic_auth_users"),
            (
                "tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n",
                "client certificates need cert_file and key_file",
            ),
            (
                "tls_server_config:\n  min_version: TLS10\n",
                "vsrscope supports TLS12 and TLS13",
            ),
            (
                "tls_server_config:\n  min_version: TLS13\n  max_version: TLS12\n",
                "min_version is above max_version",
            ),
            (
                &format!("basic_auth_users:\n  \"a:b\": {HASH}\n"),
                "contains ':'",
            ),
        ] {
            let error = load(yaml).expect_err(yaml);
            assert!(error.starts_with("--web.config.file "), "{error}");
            assert!(error.contains(reason), "{reason:?} in {error:?}");
        }
        let missing = WebConfig::load(Path::new("/nonexistent/web.yml")).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("/nonexistent/web.yml: No such file"),
            "{missing}"
        );
    }
}
