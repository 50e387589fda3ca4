//! TLS with rustls (ring provider): client-facing (`client_tls_*`: answer SSLRequest with 'S' and accept) and
//! upstream (`server_tls_mode` with libpq's sslmode meanings, `server_tls_ca_file`).

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::Stream;
use crate::protocol::codes::SSL_REQUEST;

/// A shared rustls config that compares by identity, so `Config` stays `PartialEq`/`Debug`.
#[derive(Clone)]
pub struct Shared<T>(pub Arc<T>);

impl<T> PartialEq for Shared<T> {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
}

impl<T> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<tls config>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsMode {
    /// Answer SSLRequest with 'N'.
    Disable,
    /// TLS for clients that ask, plain for the others.
    Allow,
    /// Refuse clients that do not use TLS (FATAL 28000).
    Require,
}

/// libpq's sslmode, for pgsurge's own connections to Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it, unverified; plain otherwise.
    Prefer,
    /// TLS or fail, unverified.
    Require,
    /// TLS, certificate chain checked against the CA file, host name not checked.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How pgsurge connects upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    pub mode: SslMode,
    pub config: Option<Shared<rustls::ClientConfig>>,
}

impl Default for ServerTls {
    fn default() -> Self {
        ServerTls { mode: SslMode::Disable, config: None }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The acceptor config for clients, from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("client_tls_cert {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client_tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("client_tls_cert {}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("client_tls_key {}: {e}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("client_tls_cert/client_tls_key: {e}"))
}

/// The connector config for `mode`; verify-ca and verify-full need the CA file.
pub fn client_config(mode: SslMode, ca_file: Option<&Path>) -> Result<Option<rustls::ClientConfig>, String> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca_file) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(format!("server_tls_mode {} needs server_tls_ca_file", mode.name()));
        }
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("server_tls_ca_file {}: {e}", ca.display()))? {
                let c = c.map_err(|e| format!("server_tls_ca_file {}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("server_tls_ca_file {}: {e}", ca.display()))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| e.to_string())?;
            if mode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
        _ => Arc::new(Unverified(provider())),
    };
    Ok(Some(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()))
}

/// Connects upstream per sslmode: SSLRequest, then TLS on 'S'; plain on 'N' only if the mode allows it.
pub async fn connect_upstream(mut tcp: TcpStream, host: &str, tls: &ServerTls) -> io::Result<Stream> {
    let Some(config) = &tls.config else { return Ok(Stream::Plain(tcp)) };
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8i32.to_be_bytes());
    req[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await?;
    match tcp.read_u8().await? {
        b'S' => {
            let name = ServerName::try_from(host.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let s = tokio_rustls::TlsConnector::from(config.0.clone()).connect(name, tcp).await?;
            Ok(Stream::ServerTls(Box::new(s)))
        }
        b'N' if tls.mode == SslMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(io::Error::other(format!("server does not support SSL, but server_tls_mode is {}", tls.mode.name()))),
        other => Err(io::Error::other(format!("unexpected answer {:?} to SSLRequest", other as char))),
    }
}

/// Client-facing handshake after pgsurge answered 'S'.
pub async fn accept(stream: &mut Stream, config: &Shared<rustls::ServerConfig>) -> io::Result<()> {
    let tcp = stream.take_plain()?;
    let s = tokio_rustls::TlsAcceptor::from(config.0.clone()).accept(tcp).await?;
    *stream = Stream::ClientTls(Box::new(s));
    Ok(())
}

/// verify-ca: the chain must lead to the CA; the name is not checked (libpq's meaning).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer/require: encrypted but the certificate is not checked (libpq's meaning; say so in the docs).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
