"""DICOMweb round trip: find a series in a PACS, segment it with a bundle, store the DICOM SEG and
SR back into its study (``volumed dicomweb run`` / ``watch``), on the ``dicomweb-client`` package.

::

    QIDO-RS  /studies/{study}/series            -> the series whose Modality is the bundle's (CT)
    QIDO-RS  (again)                            -> SEG and SR series of this run there already? stop: "already stored"
    WADO-RS  /studies/{study}/series/{series}   -> instances, written to a temporary folder
    inference  volumed.bundle.run.run_bundle    -> masks, statistics, segmentation.dcm, report_sr.dcm
    QIDO-RS  (again)                            -> stored meanwhile? stop: "already stored"
    STOW-RS  /studies/{study}                   -> the SEG and the SR (or the one of them missing)

Rules a reader would otherwise have to guess:

- **Nothing is stored until everything is computed.** Every step before STOW only reads from the
  PACS; a failure anywhere (PACS unreachable, an HTTP error, no CT series, a series of another
  modality, an inference error) raises :class:`DicomwebError`, which names the step (QIDO, WADO,
  inference, STOW), the URL and the study/series, and leaves the PACS as it was.
- **Re-running duplicates nothing.** The SEG's and the SR's Series and SOP Instance UIDs are derived
  from (source SeriesInstanceUID, bundle name, bundle version, prompts in order)
  (:meth:`volumed.io.writer.DicomOutputUids.derive`), so the same run makes the same UIDs; a
  series the study already holds is not stored again. Other prompts or another bundle version
  make another SEG (a new result, not a duplicate).
- **Credentials never travel on the command line.** They come from ``VOLUMED_DICOMWEB_TOKEN``
  (a bearer token), ``VOLUMED_DICOMWEB_USER`` + ``VOLUMED_DICOMWEB_PASSWORD`` (HTTP basic), or a
  file (``--credentials-file``: JSON ``{"user": ..., "password": ...}`` or ``{"token": ...}``, or
  one line ``user:password``); a URL with ``user:password@`` is refused; no log line holds them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from volumed.errors import ConfigError, VolumedError
from volumed.io.writer import DicomOutputUids

log = logging.getLogger(__name__)

__all__ = [
    "Credentials",
    "DicomwebError",
    "RoundTrip",
    "StoredOutcome",
    "WATCH_INTERVAL_RANGE_S",
    "check_url",
    "load_credentials",
    "output_uids",
    "run_round_trip",
    "watch",
]

ENV_USER = "VOLUMED_DICOMWEB_USER"
ENV_PASSWORD = "VOLUMED_DICOMWEB_PASSWORD"
ENV_TOKEN = "VOLUMED_DICOMWEB_TOKEN"
WATCH_INTERVAL_RANGE_S = (5.0, 3600.0)
DEFAULT_TIMEOUT_S = 60.0
STEPS = ("QIDO", "WADO", "inference", "STOW")

# DICOM JSON tags (PS3.18 F.2) of the QIDO attributes read here.
_MODALITY = "00080060"
_SERIES_UID = "0020000E"
_STUDY_UID = "0020000D"
_SERIES_DESCRIPTION = "0008103E"
_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances


class DicomwebError(VolumedError):
    """A DICOMweb round-trip step failed; ``step`` is QIDO, WADO, inference or STOW, and the
    message names the PACS URL, the study/series and the problem. The PACS is unchanged."""

    def __init__(self, step: str, url: str, problem: str):
        self.step = step
        self.url = url
        super().__init__(f"{step} at {url}: {problem}")


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials: a bearer ``token``, or ``user`` and ``password`` (basic). ``repr`` hides them."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = ""

    def __repr__(self) -> str:
        kind = "token" if self.token else f"user {self.user!r}"
        return f"Credentials({kind} from {self.source})"


def check_url(url: str) -> str:
    """The DICOMweb base URL without a trailing slash; refuses another scheme than http(s), a
    missing host, and credentials in the URL (the message shows the URL without them)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) DICOMweb URL: {url!r} (e.g. http://localhost:8042/dicom-web)", "--url")
    if parts.username is not None or parts.password is not None:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        shown = urlunsplit((parts.scheme, host, parts.path, "", ""))
        raise ConfigError(
            f"the URL holds credentials ({shown} with user:password@): never put them on the command line; "
            f"set {ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN}) in the environment, or pass --credentials-file PATH",
            "--url",
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"the DICOMweb base URL takes no query or fragment: {url!r}", "--url")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def load_credentials(credentials_file: str | Path | None = None,
                     environ: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials from ``credentials_file`` when given, else from the environment, else ``None``.

    Raises:
        ConfigError: an unreadable or malformed file, a user without a password (or the
            reverse); the message never quotes a secret.
    """
    env = os.environ if environ is None else environ
    if credentials_file is not None:
        path = Path(credentials_file)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"cannot read the credentials file: {err.strerror or err}", path) from None
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"not valid JSON (line {err.lineno}); expected {{\"user\": ..., \"password\": ...}} "
                                  "or {\"token\": ...}", path) from None
            if not isinstance(data, dict) or not set(data) <= {"user", "password", "token"}:
                raise ConfigError("a JSON credentials file holds only the keys user, password, token", path)
            return _credentials(data.get("user"), data.get("password"), data.get("token"), str(path))
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 1 or ":" not in lines[0]:
            raise ConfigError("expected one line user:password, or JSON {\"user\": ..., \"password\": ...} "
                              "or {\"token\": ...}", path)
        user, password = lines[0].split(":", 1)
        return _credentials(user.strip(), password, None, str(path))
    return _credentials(env.get(ENV_USER), env.get(ENV_PASSWORD), env.get(ENV_TOKEN), "the environment")


def _credentials(user, password, token, source: str) -> Credentials | None:
    user, password, token = (v if isinstance(v, str) and v else None for v in (user, password, token))
    if token and (user or password):
        raise ConfigError(f"give a token or a user and password, not both ({source})", "credentials")
    if bool(user) != bool(password):
        raise ConfigError(f"a user needs a password and a password a user ({source}: "
                          f"{ENV_USER} and {ENV_PASSWORD}, or user:password)", "credentials")
    if not (user or token):
        return None
    return Credentials(user=user, password=password, token=token, source=source)


def make_client(url: str, credentials: Credentials | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A ``dicomweb_client.DICOMwebClient`` for ``url``: credentials on its session (never in the
    URL or a log line), a timeout on every request, and no automatic retries (a failed step is
    reported at once; running again is safe)."""
    import requests
    from dicomweb_client import DICOMwebClient

    # dicomweb-client logs each request at DEBUG (headers included); keep it out of our logs.
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    session = requests.Session()
    session.trust_env = False  # no ~/.netrc credentials or proxies picked up behind the user's back
    if credentials is not None and credentials.token:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    elif credentials is not None:
        session.auth = (credentials.user, credentials.password)
    client = DICOMwebClient(url, session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _problem(err: BaseException) -> str:
    """One line for a failed request: the HTTP status and reason, or the connection problem."""
    import requests

    if isinstance(err, requests.HTTPError) and err.response is not None:
        r = err.response
        body = (r.text or "").strip().replace("\n", " ")
        return f"HTTP {r.status_code} {r.reason or ''}".rstrip() + (f" ({body[:200]})" if body else "")
    if isinstance(err, requests.ConnectionError):
        root = err
        while root.__context__ is not None and not isinstance(root, ConnectionRefusedError):
            root = root.__context__
        if isinstance(root, ConnectionRefusedError):
            return "connection refused (is the PACS running, and is this its DICOMweb URL?)"
        return f"cannot connect ({type(err).__name__})"
    if isinstance(err, requests.Timeout):
        return "no answer in time (timeout)"
    return f"{type(err).__name__}: {err}"


@contextmanager
def _step(step: str, url: str, what: str) -> Iterator[None]:
    """Turn a failed request inside ``step`` into a :class:`DicomwebError` naming step, URL and ``what``."""
    import requests

    try:
        yield
    except DicomwebError:
        raise
    except (requests.RequestException, ValueError, OSError) as err:
        raise DicomwebError(step, url, f"{what}: {_problem(err)}") from err


def _value(item: Mapping, tag: str) -> str | int | None:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


@dataclass(frozen=True)
class SeriesInfo:
    """One series as QIDO-RS describes it."""

    study_uid: str
    series_uid: str
    modality: str
    description: str = ""
    instances: int | None = None

    @classmethod
    def from_json(cls, item: Mapping, study_uid: str | None = None) -> "SeriesInfo":
        count = _value(item, _INSTANCES)
        return cls(study_uid=str(_value(item, _STUDY_UID) or study_uid or ""), series_uid=str(_value(item, _SERIES_UID) or ""),
                   modality=str(_value(item, _MODALITY) or ""), description=str(_value(item, _SERIES_DESCRIPTION) or ""),
                   instances=int(count) if count is not None else None)


@dataclass(frozen=True)
class BundleInfo:
    """What the round trip needs to know of a bundle: where it is, its name, version, input
    modality and default prompts."""

    root: Path
    name: str
    version: str
    modality: str
    default_prompts: tuple[str, ...]

    @classmethod
    def read(cls, bundle: str | Path) -> "BundleInfo":
        """Name, version, modality and default prompts from the bundle's JSON files, without
        importing torch or MONAI (so a PACS problem is reported in a second); :meth:`check`
        runs the bundle's full checks."""
        root = Path(bundle)
        meta_path, config_path = root / "configs" / "metadata.json", root / "configs" / "inference.json"
        for path in (meta_path, config_path):
            if not path.is_file():
                raise ConfigError(f"not a runnable bundle: {path.relative_to(root)} is missing", root)
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"unreadable bundle file: {err}", root) from None
        if not isinstance(metadata, dict) or "version" not in metadata:
            raise ConfigError("the metadata has no version", meta_path)
        image = ((metadata.get("network_data_format") or {}).get("inputs") or {}).get("image") or {}
        modality = str(image.get("modality") or "").upper()
        if not modality:
            raise ConfigError("the metadata names no input modality (network_data_format.inputs.image.modality)",
                              root / "configs" / "metadata.json")
        prompts = (config.get("displayable_configs") or {}).get("prompts") or []
        return cls(root=root, name=str(metadata.get("name") or root.name), version=str(metadata["version"]),
                   modality=modality, default_prompts=tuple(str(p) for p in prompts))

    def check(self) -> None:
        """The bundle's checks (:func:`volumed.bundle.loader.check_bundle`: metadata against the
        schema, MONAI version, the weights' sha256), before anything is retrieved."""
        from volumed.bundle.loader import check_bundle

        _, _, notes, _ = check_bundle(self.root)
        for note in notes:
            log.warning("%s", note)


def output_uids(source_series_uid: str, bundle: BundleInfo, prompts: Sequence[str]) -> DicomOutputUids:
    """The SEG's and SR's Series/SOP Instance UIDs of running ``bundle`` with ``prompts`` (in
    order: segment k is prompt k) on the series ``source_series_uid``; the same inputs always give
    the same UIDs."""
    return DicomOutputUids.derive(source_series_uid, bundle.name, bundle.version, "\x1f".join(prompts) or "-")


@dataclass(frozen=True)
class StoredOutcome:
    """What one round trip did: ``status`` is "stored" or "already stored"."""

    status: str
    study_uid: str
    series_uid: str
    uids: DicomOutputUids
    stored: tuple[str, ...] = ()  # "SEG", "SR": what this run stored
    output_dir: Path | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        what = f"SEG series {self.uids.seg_series}, SR series {self.uids.sr_series}"
        if self.status == "already stored":
            return f"already stored: study {self.study_uid} holds this run's {what}; nothing stored"
        return f"stored {' and '.join(self.stored)} in study {self.study_uid} ({what}) in {self.seconds:.1f} s"


class RoundTrip:
    """The steps of ``volumed dicomweb run`` against one PACS (:func:`run_round_trip` runs them)."""

    def __init__(self, url: str, bundle: BundleInfo, *, credentials: Credentials | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, client=None):
        self.url = check_url(url)
        self.bundle = bundle
        self.client = client if client is not None else make_client(self.url, credentials, timeout_s=timeout_s)

    # -- QIDO ---------------------------------------------------------------------------------
    def study_series(self, study_uid: str) -> list[SeriesInfo]:
        """Every series of the study (QIDO-RS); refuses a study the PACS does not hold."""
        with _step("QIDO", self.url, f"series of study {study_uid}"):
            found = self.client.search_for_series(
                study_instance_uid=study_uid,
                fields=["Modality", "SeriesInstanceUID", "SeriesDescription", "NumberOfSeriesRelatedInstances"],
            )
        series = [SeriesInfo.from_json(item, study_uid) for item in found or []]
        if not series:
            raise DicomwebError("QIDO", self.url, f"no study {study_uid} (or it holds no series)")
        return series

    def choose_series(self, study_uid: str, series_uid: str | None, series: Sequence[SeriesInfo]) -> SeriesInfo:
        """The series to segment: ``series_uid`` when given (refused if its modality is not the
        bundle's), else the one series of the bundle's modality (refused if none or several)."""
        want = self.bundle.modality
        if series_uid:
            match = [s for s in series if s.series_uid == series_uid]
            if not match:
                raise DicomwebError("QIDO", self.url, f"study {study_uid} has no series {series_uid}")
            if match[0].modality != want:
                raise DicomwebError("QIDO", self.url, f"series {series_uid} of study {study_uid} is {match[0].modality or 'of no modality'}; "
                                    f"the bundle {self.bundle.root.name} segments {want} only")
            return match[0]
        fitting = [s for s in series if s.modality == want]
        if not fitting:
            have = ", ".join(sorted({s.modality or "?" for s in series}))
            raise DicomwebError("QIDO", self.url, f"study {study_uid} has no {want} series (it has {have}); "
                                f"the bundle {self.bundle.root.name} segments {want} only")
        if len(fitting) > 1:
            listed = "; ".join(f"{s.series_uid} ({s.description or 'no description'}, {s.instances} instances)" for s in fitting)
            raise DicomwebError("QIDO", self.url, f"study {study_uid} has {len(fitting)} {want} series; choose one with "
                                f"--series: {listed}")
        return fitting[0]

    def present(self, study_uid: str, uids: DicomOutputUids) -> set[str]:
        """Which of this run's SEG and SR series the study holds already: a subset of {"SEG", "SR"}."""
        with _step("QIDO", self.url, f"series of study {study_uid}"):
            found = self.client.search_for_series(study_instance_uid=study_uid, fields=["SeriesInstanceUID"])
        have = {str(_value(item, _SERIES_UID)) for item in found or []}
        return {kind for kind, uid in (("SEG", uids.seg_series), ("SR", uids.sr_series)) if uid in have}

    # -- WADO ---------------------------------------------------------------------------------
    def retrieve(self, info: SeriesInfo, folder: Path) -> int:
        """Write the series' instances into ``folder`` (WADO-RS), one file per SOP Instance UID."""
        import pydicom

        with _step("WADO", self.url, f"series {info.series_uid} of study {info.study_uid}"):
            # transfer-syntax=*: the instances as stored (a PACS may not transcode, e.g. Orthanc and JPEG 2000);
            # the reader decodes what the files hold.
            datasets = self.client.retrieve_series(study_instance_uid=info.study_uid, series_instance_uid=info.series_uid,
                                                   media_types=(("application/dicom", "*"),))
        if not datasets:
            raise DicomwebError("WADO", self.url, f"series {info.series_uid} of study {info.study_uid} returned no instance")
        for k, ds in enumerate(datasets):
            modality = str(getattr(ds, "Modality", ""))
            if modality != self.bundle.modality:
                raise DicomwebError("WADO", self.url, f"instance {getattr(ds, 'SOPInstanceUID', k)} of series {info.series_uid} "
                                    f"is {modality or 'of no modality'}, not {self.bundle.modality}")
            pydicom.dcmwrite(folder / f"{k:05d}.dcm", ds, enforce_file_format=True)
        return len(datasets)

    # -- inference ----------------------------------------------------------------------------
    def infer(self, info: SeriesInfo, series_dir: Path, out_dir: Path, prompts: Sequence[str], uids: DicomOutputUids,
              *, device: str | None, overwrite: bool):
        """The bundle on the retrieved series (:func:`volumed.bundle.run.run_bundle`, what
        ``volumed run`` runs), writing a DICOM SEG and SR with ``uids``."""
        from volumed.bundle.run import run_bundle

        where = f"series {info.series_uid} of study {info.study_uid}"
        try:
            (result,) = run_bundle(self.bundle.root, series_dir, out_dir, prompts=list(prompts) or None, device=device,
                                   overwrite=overwrite, dicom_uids=uids)
        except VolumedError as err:
            raise DicomwebError("inference", self.url, f"{where}: {err}") from err
        except (RuntimeError, ValueError, OSError) as err:
            raise DicomwebError("inference", self.url, f"{where}: {type(err).__name__}: {err}") from err
        missing = [n for n, p in (("DICOM SEG", result.dicom_seg), ("DICOM SR", result.dicom_sr)) if p is None]
        if missing:
            why = "; ".join(result.warnings) or "no reason given"
            raise DicomwebError("inference", self.url, f"{where}: no {' and no '.join(missing)} was written ({why})")
        return result

    # -- STOW ---------------------------------------------------------------------------------
    def store(self, study_uid: str, paths: Sequence[Path]) -> None:
        """Store the files into ``study_uid`` in one STOW-RS request; refused instances fail it."""
        import pydicom

        datasets = [pydicom.dcmread(p) for p in paths]
        with _step("STOW", self.url, f"storing {len(datasets)} instance(s) into study {study_uid}"):
            response = self.client.store_instances(datasets=datasets, study_instance_uid=study_uid)
        failed = list(getattr(response, "FailedSOPSequence", None) or []) if response is not None else []
        if failed:
            reasons = ", ".join(f"{getattr(i, 'ReferencedSOPInstanceUID', '?')} (reason {getattr(i, 'FailureReason', '?')})" for i in failed)
            raise DicomwebError("STOW", self.url, f"study {study_uid} refused {len(failed)} instance(s): {reasons}")


def run_round_trip(
    url: str,
    study_uid: str,
    bundle: str | Path | BundleInfo,
    *,
    series_uid: str | None = None,
    prompts: Sequence[str] = (),
    credentials: Credentials | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    trip: RoundTrip | None = None,
) -> StoredOutcome:
    """Segment a study's series from a DICOMweb PACS and store the DICOM SEG and SR into the study.

    Args:
        url: the DICOMweb base URL (e.g. ``http://localhost:8042/dicom-web``), without credentials.
        study_uid: StudyInstanceUID to segment.
        bundle: a bundle folder (its metadata names the modality it segments).
        series_uid: the series to segment; default: the study's one series of the bundle's modality.
        prompts: the prompts, in order; default the bundle's prompt list.
        credentials: from :func:`load_credentials`.
        output_dir: keep the local outputs here (what ``volumed run`` writes); default a temporary
            folder, removed afterwards.
        overwrite: replace the local outputs of an earlier run in ``output_dir``.
        device: torch device; default the bundle's.

    Returns:
        A :class:`StoredOutcome` ("stored", or "already stored" when the study holds this run's
        SEG and SR: then nothing was retrieved, computed or stored).

    Raises:
        ConfigError: a bad URL (with credentials, not http) or bundle, before any request.
        DicomwebError: a step failed (QIDO, WADO, inference, STOW); nothing was stored.
    """
    t0 = time.perf_counter()
    info_b = bundle if isinstance(bundle, BundleInfo) else BundleInfo.read(bundle)
    trip = trip or RoundTrip(url, info_b, credentials=credentials, timeout_s=timeout_s)
    effective = list(prompts) or list(info_b.default_prompts)
    log.info("QIDO %s: series of study %s", trip.url, study_uid)
    series = trip.choose_series(study_uid, series_uid, trip.study_series(study_uid))
    uids = output_uids(series.series_uid, info_b, effective)
    have = trip.present(study_uid, uids)
    if have == {"SEG", "SR"}:
        log.info("already stored: study %s holds the SEG and SR of this bundle and these prompts on series %s",
                 study_uid, series.series_uid)
        return StoredOutcome("already stored", study_uid, series.series_uid, uids, seconds=time.perf_counter() - t0)
    log.info("series %s (%s, %s instances): %d prompt(s), bundle %s %s", series.series_uid, series.modality,
             series.instances if series.instances is not None else "?", len(effective), info_b.name, info_b.version)
    if output_dir is not None:
        from volumed.inference.segment import _check_output_dir

        _check_output_dir(Path(output_dir), overwrite)  # the refusal `volumed run` gives, before the retrieval
    info_b.check()
    with tempfile.TemporaryDirectory(prefix="volumed-dicomweb-") as tmp:
        series_dir = Path(tmp) / "series"
        series_dir.mkdir()
        log.info("WADO %s: retrieving series %s", trip.url, series.series_uid)
        n = trip.retrieve(series, series_dir)
        log.info("WADO: %d instance(s) retrieved", n)
        out = Path(output_dir) if output_dir is not None else Path(tmp) / "out"
        log.info("inference: bundle %s on %d slice(s)", info_b.root, n)
        result = trip.infer(series, series_dir, out, effective, uids, device=device, overwrite=overwrite)
        for line in result.summary():
            log.info("inference: %s", line)
        have = trip.present(study_uid, uids)  # stored meanwhile by another run?
        todo = [(kind, path) for kind, path in (("SEG", result.dicom_seg), ("SR", result.dicom_sr)) if kind not in have]
        if not todo:
            return StoredOutcome("already stored", study_uid, series.series_uid, uids, output_dir=Path(output_dir) if output_dir else None,
                                 seconds=time.perf_counter() - t0)
        log.info("STOW %s: storing %s into study %s", trip.url, " and ".join(k for k, _ in todo), study_uid)
        trip.store(study_uid, [path for _, path in todo])
    outcome = StoredOutcome("stored", study_uid, series.series_uid, uids, stored=tuple(k for k, _ in todo),
                            output_dir=Path(output_dir) if output_dir else None, seconds=time.perf_counter() - t0)
    return outcome


class StopFlag:
    """Set by SIGINT/SIGTERM while :func:`watch` runs: the current series is finished, then it returns."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def set(self, signum: int | None = None, _frame=None) -> None:
        if signum is not None:
            self.signal_name = signal.Signals(signum).name
            log.info("%s: finishing the current study, then stopping", self.signal_name)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


@contextmanager
def _stop_on_signals(flag: StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; a caller in another thread sets the flag itself
        return
    previous = {s: signal.signal(s, flag.set) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def watch(
    url: str,
    bundle: str | Path,
    *,
    interval_s: float = 60.0,
    prompts: Sequence[str] = (),
    credentials: Credentials | None = None,
    device: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    once: bool = False,
    stop: StopFlag | None = None,
    on_outcome: Callable[[StoredOutcome], None] | None = None,
) -> list[StoredOutcome]:
    """Poll the PACS every ``interval_s`` seconds for series of the bundle's modality that have no
    SEG of this bundle and these prompts yet (the deterministic SEG series UID is not in their
    study), and run the round trip on each. Stops cleanly on SIGINT/SIGTERM (the series in
    progress is finished first) or, with ``once``, after one poll.

    A failed poll (PACS down) is logged and retried at the next interval; a series whose round
    trip fails is logged and not retried until the next start.

    Raises:
        ConfigError: an interval outside :data:`WATCH_INTERVAL_RANGE_S`, a bad URL or bundle.
    """
    lo, hi = WATCH_INTERVAL_RANGE_S
    if not lo <= float(interval_s) <= hi:
        raise ConfigError(f"the interval must be between {lo:g} and {hi:g} seconds, got {interval_s:g}", "--interval")
    info_b = BundleInfo.read(bundle)
    info_b.check()
    trip = RoundTrip(url, info_b, credentials=credentials, timeout_s=timeout_s)
    effective = list(prompts) or list(info_b.default_prompts)
    stop = stop or StopFlag()
    failed: set[str] = set()
    outcomes: list[StoredOutcome] = []
    with _stop_on_signals(stop):
        log.info("watching %s every %g s for %s series without a SEG of %s %s", trip.url, interval_s, info_b.modality,
                 info_b.name, info_b.version)
        while not stop.is_set():
            try:
                todo = _unprocessed(trip, effective)
            except DicomwebError as err:
                log.warning("poll failed, retrying in %g s: %s", interval_s, err)
                todo = []
            todo = [s for s in todo if s.series_uid not in failed]
            if todo:
                log.info("%d series to process", len(todo))
            for series in todo:
                if stop.is_set():
                    break
                try:
                    outcome = run_round_trip(trip.url, series.study_uid, info_b, series_uid=series.series_uid,
                                             prompts=effective, device=device, trip=trip)
                except DicomwebError as err:
                    failed.add(series.series_uid)
                    log.error("study %s series %s failed (not retried until restart): %s", series.study_uid,
                              series.series_uid, err)
                    continue
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
            if once:
                break
            stop.wait(interval_s)
    log.info("stopped%s", f" ({stop.signal_name})" if stop.signal_name else "")
    return outcomes


def _unprocessed(trip: RoundTrip, prompts: Sequence[str]) -> list[SeriesInfo]:
    """Series of the bundle's modality (QIDO over all studies) whose SEG series of this run is absent."""
    with _step("QIDO", trip.url, f"{trip.bundle.modality} series"):
        found = trip.client.search_for_series(search_filters={"Modality": trip.bundle.modality},
                                              fields=["StudyInstanceUID", "SeriesInstanceUID", "Modality"], get_remaining=True)
    with _step("QIDO", trip.url, "SEG series"):
        segs = trip.client.search_for_series(search_filters={"Modality": "SEG"}, fields=["SeriesInstanceUID"],
                                             get_remaining=True)
    done = {str(_value(item, _SERIES_UID)) for item in segs or []}
    series = [SeriesInfo.from_json(item) for item in found or []]
    return [s for s in series if s.study_uid and s.series_uid
            and output_uids(s.series_uid, trip.bundle, prompts).seg_series not in done]
