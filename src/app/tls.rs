//! The listeners' TLS, loaded and checked once at start-up: a bad certificate, key or CA
//! file is a start-up error naming the file, not a stream of failed handshakes.

use std::time::Duration;

use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::StartupError;
use crate::{
    pem::{PemContents, read_pem},
    settings::Settings,
};

/// How long a client may take to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS of the two gRPC listeners (`None`: plaintext), read and checked at build time.
#[derive(Clone, Default)]
pub(super) struct ListenerTls {
    pub(super) main: Option<ServerTlsConfig>,
    pub(super) admin: Option<ServerTlsConfig>,
}

impl ListenerTls {
    pub(super) fn load(settings: &Settings) -> Result<Self, StartupError> {
        let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
            return Ok(Self::default());
        };
        let identity = Identity::from_pem(
            read_pem(cert, PemContents::Certificate)?,
            read_pem(key, PemContents::PrivateKey)?,
        );
        let main = ServerTlsConfig::new()
            .identity(identity)
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        let mut admin = main.clone();
        if let Some(ca) = &settings.admin_tls_client_ca {
            admin = admin.client_ca_root(Certificate::from_pem(read_pem(
                ca,
                PemContents::CaCertificate,
            )?));
        }
        // Parse now: a bad certificate, key or CA is a start-up error, not failed handshakes.
        for (listener, config) in [("main", &main), ("admin", &admin)] {
            Server::builder()
                .tls_config(config.clone())
                .map_err(|error| StartupError::Tls {
                    listener,
                    message: crate::telemetry::error_chain(&error),
                })?;
        }
        Ok(Self {
            main: Some(main),
            admin: Some(admin),
        })
    }
}
