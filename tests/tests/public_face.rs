//! The router's public face, as a generic gRPC client sees it: reflection (v1 and v1alpha) lists
//! and describes only the public services; every public service answers health; gzip is accepted
//! and advertised; an oversized message is RESOURCE_EXHAUSTED; a router that runs out of time
//! says DEADLINE_EXCEEDED with reason TIMEOUT; a birth date in the future or before 1850 is a
//! field violation on `demographics.date_of_birth`.

use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{Demographics, EnrollRequest};
use nid_tests::{DevCluster, adopt_cell, enroll_request};
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

const PUBLIC: [&str; 4] =
    ["nid.v1.Admin", "nid.v1.Authentication", "nid.v1.Diagnostics", "nid.v1.Enrollment"];
const INTERNAL: [&str; 4] = ["nid.v1.Cell", "nid.v1.Control", "nid.v1.BucketAdmin", "nid.v1.RaftTransport"];

/// Lists services and looks up symbols through `grpc.reflection.v1`.
async fn reflect_v1(channel: tonic::transport::Channel, symbols: &[&str]) -> (BTreeSet<String>, Vec<bool>) {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let mut ask = async |m: MessageRequest| {
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(m) };
        let mut answers =
            client.server_reflection_info(tokio_stream([request].into_iter())).await?.into_inner();
        answers
            .message()
            .await?
            .and_then(|r| r.message_response)
            .ok_or_else(|| tonic::Status::internal("no answer"))
    };
    let listed = match ask(MessageRequest::ListServices(String::new())).await {
        Ok(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    };
    let mut found = Vec::new();
    for symbol in symbols {
        found.push(match ask(MessageRequest::FileContainingSymbol(symbol.to_string())).await {
            Ok(MessageResponse::FileDescriptorResponse(_)) => true,
            Ok(MessageResponse::ErrorResponse(_)) => false,
            Err(e) if e.code() == Code::NotFound => false,
            other => panic!("unexpected reflection answer for {symbol}: {other:?}"),
        });
    }
    (listed, found)
}

/// The same through `grpc.reflection.v1alpha` (older grpcurl builds, Python's grpcio-reflection).
async fn reflect_v1alpha(
    channel: tonic::transport::Channel,
    symbols: &[&str],
) -> (BTreeSet<String>, Vec<bool>) {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let mut ask = async |m: MessageRequest| {
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(m) };
        let mut answers =
            client.server_reflection_info(tokio_stream([request].into_iter())).await?.into_inner();
        answers
            .message()
            .await?
            .and_then(|r| r.message_response)
            .ok_or_else(|| tonic::Status::internal("no answer"))
    };
    let listed = match ask(MessageRequest::ListServices(String::new())).await {
        Ok(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    };
    let mut found = Vec::new();
    for symbol in symbols {
        found.push(match ask(MessageRequest::FileContainingSymbol(symbol.to_string())).await {
            Ok(MessageResponse::FileDescriptorResponse(_)) => true,
            Ok(MessageResponse::ErrorResponse(_)) => false,
            Err(e) if e.code() == Code::NotFound => false,
            other => panic!("unexpected reflection answer for {symbol}: {other:?}"),
        });
    }
    (listed, found)
}

/// A request stream of the given messages, then the end of the stream.
fn tokio_stream<T: Send + 'static>(
    items: impl Iterator<Item = T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> {
    tonic::codegen::tokio_stream::iter(items.collect::<Vec<_>>())
}

fn person(date_of_birth: &str) -> Demographics {
    Demographics {
        full_name: "Face Person".into(),
        date_of_birth: date_of_birth.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_shows_only_its_public_face_and_keeps_to_the_error_model() {
    let dev = DevCluster::start(1);
    let router = dev.router();
    let channel = nid_tests::connect(&router).await;

    // Reflection, v1 and v1alpha: the public services, health and reflection itself; internal
    // services are neither listed nor described.
    let mut symbols: Vec<&str> = PUBLIC.to_vec();
    symbols.extend(INTERNAL);
    symbols.push("nid.v1.CellRequest");
    let (listed, found) = reflect_v1(channel.clone(), &symbols).await;
    let mut want: BTreeSet<String> = PUBLIC.iter().map(|s| s.to_string()).collect();
    want.insert("grpc.health.v1.Health".into());
    assert_eq!(listed, {
        let mut w = want.clone();
        w.insert("grpc.reflection.v1.ServerReflection".into());
        w
    });
    assert_eq!(
        found,
        [true, true, true, true, false, false, false, false, false],
        "public described, internal not"
    );
    let (listed, found) = reflect_v1alpha(channel.clone(), &symbols).await;
    assert_eq!(listed, {
        let mut w = want.clone();
        w.insert("grpc.reflection.v1alpha.ServerReflection".into());
        w
    });
    assert_eq!(found, [true, true, true, true, false, false, false, false, false]);

    // Health: the server as a whole and every public service are SERVING; internal ones unknown.
    let mut health = HealthClient::new(channel.clone());
    for service in PUBLIC.iter().chain(&[""]) {
        let r = health.check(HealthCheckRequest { service: service.to_string() }).await;
        let status = r.unwrap_or_else(|e| panic!("health of {service:?}: {e:?}")).into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    for service in INTERNAL {
        let e = health.check(HealthCheckRequest { service: service.into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{service}");
    }

    // gzip: a compressed request is accepted, and every answer advertises what the router accepts.
    let mut gz = EnrollmentClient::new(channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let r = gz.enroll(enroll_request("FACE-GZIP", "Face Person")).await.expect("a gzip request");
    let accepted = r.metadata().get("grpc-accept-encoding").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(accepted.contains("gzip"), "grpc-accept-encoding: {accepted:?}");
    assert!(r.into_inner().created);

    // 5 MiB: RESOURCE_EXHAUSTED, as gRPC's status table says for a message over the limit.
    let mut c = EnrollmentClient::new(channel.clone());
    let mut huge = enroll_request("FACE-HUGE", "Face Person");
    huge.demographics.as_mut().unwrap().full_name = "x".repeat(5 << 20);
    let e = c.enroll(huge).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // Birth dates: none in the future (by the enrolling clock, a day of tolerance), none before 1850.
    let today = time_today();
    let cases = [
        ("2999-01-01".to_owned(), false),
        ("9999-12-31".to_owned(), false),
        (today.plus_days(2).as_str(), false),
        ("1849-12-31".to_owned(), false),
        ("1850-01-01".to_owned(), true),
        (today.as_str(), true),
    ];
    for (i, (dob, ok)) in cases.iter().enumerate() {
        let request = EnrollRequest {
            rid: format!("FACE-DOB-{i}"),
            demographics: Some(person(dob)),
            ..Default::default()
        };
        match c.enroll(request).await {
            Ok(r) => assert!(*ok && r.into_inner().created, "birth date {dob} accepted"),
            Err(e) => {
                assert!(!ok, "birth date {dob} refused: {e:?}");
                assert_eq!(e.code(), Code::InvalidArgument, "{dob}: {e:?}");
                let fields: Vec<String> = e
                    .get_details_bad_request()
                    .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
                    .unwrap_or_default();
                assert_eq!(fields, ["demographics.date_of_birth"], "{dob}");
            }
        }
    }

    // Out of time: with every replica of the data cell frozen, the router answers the client's
    // deadline itself, DEADLINE_EXCEEDED with reason TIMEOUT (never CANCELLED or a raw transport
    // error). The header is set by hand so that the answer comes from the router, not from a
    // timer in this client.
    let cell = adopt_cell(&dev, 0);
    for r in &cell {
        r.pause();
    }
    let mut request = tonic::Request::new(enroll_request("FACE-FROZEN", "Face Person"));
    request.metadata_mut().insert("grpc-timeout", "1500m".parse().unwrap());
    let answer = tokio::time::timeout(Duration::from_secs(5), c.enroll(request)).await;
    for r in &cell {
        r.resume();
    }
    let e = answer.expect("the router answers within the deadline").unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert_eq!(nid_proto::error::reason_of(&e).as_deref(), Some("TIMEOUT"), "{e:?}");
}

/// Today's date (UTC) as YYYY-MM-DD, and arithmetic on it, without a date crate.
struct Day(i64);

fn time_today() -> Day {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    Day((secs / 86_400) as i64)
}

impl Day {
    fn plus_days(&self, n: i64) -> Day {
        Day(self.0 + n)
    }

    /// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    fn as_str(&self) -> String {
        let z = self.0 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!("{y:04}-{m:02}-{d:02}")
    }
}
