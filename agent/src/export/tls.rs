//! TLS for OTLP export, all on rustls with the ring provider (no OpenSSL, no aws-lc):
//! the roots the receiver's certificate must chain to, the client certificate for
//! mutual TLS, the name the receiver's certificate must be valid for, and what a failed
//! handshake means for a person reading the log ([`TlsFailure`]).
//!
//! Roots: the system's store (honouring SSL_CERT_FILE / SSL_CERT_DIR), or Mozilla's
//! bundle when the system has none (a distroless container), plus an optional CA file.
//! Every file is read and checked at start-up, so a wrong path or a key that does not
//! belong to its certificate stops the agent with a message naming the file.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use tracing::warn;

use super::ExportError;
use super::config::{ClientAuth, OtlpConfig};

/// The crypto provider of every TLS connection the exporter makes.
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client identity, read from its PEM files and checked.
pub(super) struct Identity {
    key: Arc<CertifiedKey>,
}

impl Identity {
    /// Reads and checks `auth`'s files: certificates in one, a key in the other, and a
    /// key that belongs to the first certificate.
    pub fn load(auth: &ClientAuth) -> Result<Self, ExportError> {
        let bad = |reason: String| ExportError::ClientCert {
            cert: auth.cert.clone(),
            key: auth.key.clone(),
            reason,
        };
        let cert_pem = std::fs::read(&auth.cert)
            .map_err(|e| bad(format!("cannot read {}: {e}", auth.cert.display())))?;
        let key_pem = std::fs::read(&auth.key)
            .map_err(|e| bad(format!("cannot read {}: {e}", auth.key.display())))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("{}: {e}", auth.cert.display())))?;
        if chain.is_empty() {
            return Err(bad(format!(
                "no PEM certificate in {}",
                auth.cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            bad(format!(
                "no PEM private key in {} ({e})",
                auth.key.display()
            ))
        })?;
        let key = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| bad(format!("the key does not fit the certificate: {e}")))?;
        Ok(Identity { key: Arc::new(key) })
    }
}

/// The client certificate every handshake offers (or none), and how many handshakes
/// the receiver asked for one in. A receiver that refuses the certificate (or its
/// absence) under TLS 1.3 learns of it only after the client's handshake is done; it
/// sends an alert and closes, and when the client's first request crosses that close
/// the alert is lost to a broken pipe or a reset. That the receiver asked is then what
/// says the failure is the certificate's ([`ClientCert::asked`]).
#[derive(Debug)]
pub(super) struct ClientCert {
    key: Option<Arc<CertifiedKey>>,
    asked: AtomicU64,
}

impl ClientCert {
    pub fn new(identity: Option<&Identity>) -> Arc<Self> {
        Arc::new(ClientCert {
            key: identity.map(|id| Arc::clone(&id.key)),
            asked: AtomicU64::new(0),
        })
    }

    /// Handshakes so far in which the receiver asked for a client certificate.
    pub fn asked(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }

    /// What a connection that broke right after a handshake in which the receiver
    /// asked for a client certificate most likely means, in words
    /// [`TlsFailure::classify`] reads.
    pub fn refusal(&self) -> &'static str {
        if self.key.is_some() {
            "the receiver asked for a client certificate and closed the connection after \
             it was sent"
        } else {
            "the receiver asked for a client certificate and closed the connection; none \
             is configured"
        }
    }
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// The rustls client config of both OTLP protocols for `config`: its roots, its
/// client certificate, its server name override, and `alpn` (`h2` for gRPC).
pub(super) fn client_config(
    config: &OtlpConfig,
    roots: RootCertStore,
    cert: Arc<ClientCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, ExportError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ExportError::Tls(e.to_string()))?;
    let builder = match &config.server_name {
        None => builder.with_root_certificates(roots),
        Some(name) => {
            let name = server_name(name)?;
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| ExportError::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NameOverride { inner, name }))
        }
    };
    let mut tls = builder.with_client_cert_resolver(cert);
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tls)
}

/// `--otlp-server-name`, checked.
pub(super) fn server_name(name: &str) -> Result<ServerName<'static>, ExportError> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| ExportError::Tls(format!("server name {name:?} is not a DNS name or IP: {e}")))
}

/// Verifies the receiver's certificate in full (chain, dates, signatures) for another
/// name than the one connected to: what `--otlp-server-name` asks for. Only the name
/// changes; nothing is skipped.
#[derive(Debug)]
struct NameOverride {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_to: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The roots an https endpoint's certificate must chain to.
pub(crate) fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, ExportError> {
    let mut store = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    store.add_parsable_certificates(native.certs);
    if store.is_empty() {
        warn!(
            errors = ?native.errors,
            "no CA certificates in the system store; trusting the bundled Mozilla roots"
        );
        store.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    }
    if let Some(path) = ca_file {
        let unreadable = |reason: String| ExportError::CaFile {
            path: path.to_owned(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(e.to_string()))?;
        if certs.is_empty() {
            return Err(unreadable("no PEM certificate in it".to_owned()));
        }
        for cert in certs {
            store.add(cert).map_err(|e| unreadable(e.to_string()))?;
        }
    }
    Ok(store)
}

/// Why a TLS handshake with the receiver failed: the `cause` label of
/// `sonde_export_tls_failures_total`, and what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The receiver's certificate does not chain to a trusted CA.
    UnknownIssuer,
    /// The receiver's certificate is expired or not valid yet.
    ServerCertExpired,
    /// The receiver's certificate is not valid for the name connected to.
    NameMismatch,
    /// The receiver refused our client certificate (or wanted one and got none).
    ClientCertRejected,
    /// Any other handshake failure.
    Other,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 5] = [
        TlsFailure::UnknownIssuer,
        TlsFailure::ServerCertExpired,
        TlsFailure::NameMismatch,
        TlsFailure::ClientCertRejected,
        TlsFailure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => "unknown_issuer",
            TlsFailure::ServerCertExpired => "server_certificate_expired",
            TlsFailure::NameMismatch => "server_name_mismatch",
            TlsFailure::ClientCertRejected => "client_certificate_rejected",
            TlsFailure::Other => "other",
        }
    }

    /// What the person reading the log should do.
    pub fn hint(self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => {
                "the receiver's certificate is not signed by a CA sonde trusts: give the CA \
                 that signed it with --otlp-ca-file"
            }
            TlsFailure::ServerCertExpired => {
                "the receiver's certificate is expired (or not valid yet): renew it on the \
                 receiver, and check the clocks"
            }
            TlsFailure::NameMismatch => {
                "the receiver's certificate is not valid for the endpoint's host: connect by \
                 a name the certificate lists, or set --otlp-server-name to one"
            }
            TlsFailure::ClientCertRejected => {
                "the receiver refused sonde's client certificate (or wanted one): check that \
                 --otlp-client-cert is signed by the CA the receiver trusts for clients and \
                 is not expired"
            }
            TlsFailure::Other => "the TLS handshake with the receiver failed",
        }
    }

    /// The failure a send error's text (its whole cause chain) describes, if it is one
    /// of TLS. rustls's messages are stable and name the cause.
    pub fn classify(reason: &str) -> Option<TlsFailure> {
        let r = reason.to_ascii_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| r.contains(w));
        if any(&["unknownissuer", "unknown issuer", "badsignature"]) {
            Some(TlsFailure::UnknownIssuer)
        } else if any(&[
            "invalid peer certificate: expired",
            "certificate expired",
            "notvalidyet",
            "not valid yet",
        ]) && !r.contains("received fatal alert")
        {
            Some(TlsFailure::ServerCertExpired)
        } else if any(&["notvalidforname", "not valid for name"]) {
            Some(TlsFailure::NameMismatch)
        } else if any(&[
            "received fatal alert: badcertificate",
            "received fatal alert: certificaterequired",
            "received fatal alert: unknownca",
            "received fatal alert: certificateexpired",
            "received fatal alert: certificaterevoked",
            "received fatal alert: certificateunknown",
            "received fatal alert: unsupportedcertificate",
            "received fatal alert: accessdenied",
            "asked for a client certificate and closed the connection",
        ]) {
            Some(TlsFailure::ClientCertRejected)
        } else if any(&[
            "invalid peer certificate",
            "received fatal alert",
            "handshake",
        ]) {
            Some(TlsFailure::Other)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_messages_name_the_cause() {
        let cases = [
            (
                "error sending request: client error (Connect): invalid peer certificate: UnknownIssuer",
                Some(TlsFailure::UnknownIssuer),
            ),
            (
                "invalid peer certificate: certificate expired: verification time 1 (UNIX), but certificate is not valid after 0 (0 seconds ago)",
                Some(TlsFailure::ServerCertExpired),
            ),
            (
                "invalid peer certificate: certificate not valid for name \"otlp.example\"; certificate is only valid for DnsName(\"localhost\")",
                Some(TlsFailure::NameMismatch),
            ),
            (
                "invalid peer certificate: NotValidForName",
                Some(TlsFailure::NameMismatch),
            ),
            (
                "transport error: received fatal alert: CertificateRequired",
                Some(TlsFailure::ClientCertRejected),
            ),
            (
                "received fatal alert: BadCertificate",
                Some(TlsFailure::ClientCertRejected),
            ),
            (
                "received fatal alert: HandshakeFailure",
                Some(TlsFailure::Other),
            ),
            ("tcp connect error: Connection refused (os error 111)", None),
        ];
        let none = ClientCert::new(None);
        let cases = cases
            .into_iter()
            .chain([(none.refusal(), Some(TlsFailure::ClientCertRejected))]);
        for (text, want) in cases {
            assert_eq!(TlsFailure::classify(text), want, "{text}");
        }
    }

    #[test]
    fn https_endpoint_gets_roots_even_without_a_system_store() {
        let store = root_store(None).unwrap();
        assert!(!store.is_empty());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "not a certificate\n").unwrap();
        let err = root_store(Some(file.path())).unwrap_err();
        assert!(
            err.to_string().contains(&file.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_client_key_that_is_not_the_certificates_is_refused_at_start() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/export/testdata");
        let ok = ClientAuth {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        assert!(Identity::load(&ok).is_ok());
        let wrong = ClientAuth {
            cert: dir.join("ca.pem"),
            key: dir.join("server.key"),
        };
        let err = Identity::load(&wrong)
            .err()
            .expect("a mismatched key is refused")
            .to_string();
        assert!(
            err.contains("ca.pem") && err.contains("does not fit"),
            "{err}"
        );
        let missing = ClientAuth {
            cert: dir.join("nope.pem"),
            key: dir.join("server.key"),
        };
        let err = Identity::load(&missing).err().unwrap().to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
