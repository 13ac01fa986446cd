//! Reading the PEM files of TLS, for the listeners (`app`) and the clients (`cli`) alike. Each
//! file must hold the blocks it is for: the TLS library's own complaint about a wrong file
//! ("peer sent no certificates") would not say which file is wrong.

use std::path::{Path, PathBuf};

/// What a PEM file is expected to hold.
#[derive(Debug, Clone, Copy)]
pub enum PemContents {
    Certificate,
    CaCertificate,
    PrivateKey,
}

impl PemContents {
    fn marker(self) -> &'static str {
        match self {
            Self::Certificate | Self::CaCertificate => "-----BEGIN CERTIFICATE-----",
            // PKCS#8, PKCS#1 ("RSA PRIVATE KEY") and SEC1 ("EC PRIVATE KEY") alike.
            Self::PrivateKey => "PRIVATE KEY-----",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::CaCertificate => "CA certificate",
            Self::PrivateKey => "private key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Missing { path: PathBuf, what: &'static str },
}

/// The file's bytes, once it is known to hold `contents`.
pub fn read_pem(path: &Path, contents: PemContents) -> Result<Vec<u8>, PemError> {
    let pem = std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })?;
    if String::from_utf8_lossy(&pem).contains(contents.marker()) {
        Ok(pem)
    } else {
        Err(PemError::Missing {
            path: path.to_owned(),
            what: contents.name(),
        })
    }
}
