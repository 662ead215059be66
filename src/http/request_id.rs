//! Request ids: each request to the router has one, taken from its `x-request-id` header or made
//! for it, which the response echoes and every audit event of the request records.

use axum::extract::{FromRequestParts, Request};
use axum::http::HeaderValue;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::audit::RequestId;
use crate::{KeyService, KeyStore};

/// The header that carries a request's id, both ways.
pub const X_REQUEST_ID: &str = "x-request-id";

/// Gives the request an id: the client's `x-request-id` if it sent exactly one valid id (1 to 128
/// letters, digits or `_-.:@`), else a new one; and sets it on the response. [`router`](super::router)
/// runs it on every request.
pub async fn request_ids(mut request: Request, next: Next) -> Response {
    let mut sent = request.headers().get_all(X_REQUEST_ID).iter();
    let given = match (sent.next(), sent.next()) {
        (Some(one), None) => one.to_str().ok().and_then(|id| RequestId::new(id).ok()),
        _ => None,
    };
    let id = given.unwrap_or_else(RequestId::generate);
    let header = HeaderValue::from_str(id.as_str());
    request.extensions_mut().insert(id);
    let mut response = next.run(request).await;
    if let Ok(header) = header {
        response.headers_mut().insert(X_REQUEST_ID, header);
    }
    response
}

/// The router's service, recording the request's id in every change it makes.
pub(crate) struct InRequest<St: KeyStore>(pub(crate) KeyService<St>);

impl<St: KeyStore> FromRequestParts<KeyService<St>> for InRequest<St> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, service: &KeyService<St>) -> Result<Self, Self::Rejection> {
        Ok(Self(match parts.extensions.get::<RequestId>() {
            Some(id) => service.in_request(id.clone()),
            None => service.clone(),
        }))
    }
}
