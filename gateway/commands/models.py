"""``gateway models sign | verify | check | encrypt | rewrap`` and ``gateway infer``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.commands import add_area, config_opt, load, opt

if TYPE_CHECKING:
    from gateway.config import SupplyConfig
    from gateway.registry.manifest import Manifest

__all__ = ["add_parsers"]


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4
"""``gateway infer``'s exit codes: refused means the gateway said no (401, 403, 4xx)."""


def _load_inputs(path: Path) -> Any:
    """The inputs in ``path`` (``.npy``, ``.npz`` or ``.json``); ``ValueError`` saying what is wrong."""
    import json as jsonlib

    import numpy as np

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        doc = jsonlib.loads(path.read_text())
    except jsonlib.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); expected an array or "
                         "{name: array}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read as {path.suffix or 'JSON'} ({exc})") from None

    def array(value: object) -> np.ndarray:  # JSON numbers with a fraction are taken as FP32
        a = np.asarray(value)
        return a.astype(np.float32) if a.dtype.kind == "f" else a

    if isinstance(doc, dict):
        return {k: array(v) for k, v in doc.items()}
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected an array or {{name: array}}, not {type(doc).__name__}")
    return array(doc)


def _cmd_infer(args: argparse.Namespace) -> int:
    """``gateway infer MODEL --input x.npy|x.json``: one inference through the SDK."""
    import difflib
    import json as jsonlib

    from gateway_client import Client, ClientError, RetryPolicy
    from gateway_client.errors import GatewayError, NotFound

    try:
        inputs = _load_inputs(Path(args.input))
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        credentials = jsonlib.loads(Path(args.credentials).read_text())
        known = sorted(credentials.get("principals", {}))
        if args.principal not in known:
            hint = difflib.get_close_matches(args.principal, known, 1)
            print(f"gateway: {args.credentials} has no principal {args.principal!r} (it has: {', '.join(known)})"
                  + (f"; did you mean {hint[0]!r}?" if hint else ""), file=sys.stderr)
            return EXIT_USAGE
        client = Client.from_credentials(args.credentials, args.principal, retry=RetryPolicy(deadline_s=args.deadline))
    except (OSError, ValueError, KeyError) as exc:
        print(f"gateway: {args.credentials}: {exc.strerror if isinstance(exc, OSError) else exc!r} "
              "(`gateway init` writes it; --credentials names another)", file=sys.stderr)
        return EXIT_USAGE
    with client:
        try:
            outputs = client.infer(args.model, _as_declared(client, args.model, args.version, inputs),
                                   version=args.version, binary=not args.json_tensors)
        except NotFound as exc:
            try:
                names = [m["name"] for m in client.models()]
            except ClientError:
                names = []
            hint = difflib.get_close_matches(args.model, names, 1)
            print(f"gateway: {exc}" + (f"; did you mean {hint[0]!r}?" if hint else ""), file=sys.stderr)
            return EXIT_NOT_FOUND
        except GatewayError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return EXIT_REFUSED if 400 <= exc.status < 500 else EXIT_FAILED
        except ClientError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return EXIT_FAILED
    _emit({name: _portable(a) for name, a in outputs.items()}, args.output, args.format)
    return EXIT_OK


def _emit(outputs: dict[str, Any], path: str, form: str) -> None:
    """The outputs saved to ``path`` (an .npz), or printed as JSON or YAML."""
    import json as jsonlib

    import numpy as np

    if path:
        np.savez(path, **outputs)
        print(f"wrote {', '.join(outputs)} to {path}")
        return
    doc = {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                  "data": (np.char.decode(a, "utf-8", "backslashreplace") if a.dtype.kind == "S" else a).tolist()}
           for name, a in outputs.items()}
    if form == "yaml":
        import yaml

        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        print(jsonlib.dumps(doc))


def _portable(array: Any) -> Any:
    """A BYTES output (an object array of ``bytes``) as numpy's own str array when it is UTF-8 text,
    else its bytes array: printable, and saved in an .npz that loads without pickle."""
    import numpy as np

    if array.dtype != object:
        return array
    elements = list(array.reshape(-1))
    try:
        return np.array([e.decode("utf-8") for e in elements], dtype=str).reshape(array.shape)
    except UnicodeDecodeError:
        return np.array(elements, dtype=bytes).reshape(array.shape)


def _as_declared(client: Any, model: str, version: str | None, inputs: Any) -> Any:
    """Numbers as the model declares them: a JSON file's integers (or an .npy of float64) become
    the FP32 a model asks for, as a program would have sent them; anything else is left to the
    gateway's signature check."""
    from gateway_client.protocol.datatypes import DATATYPES

    declared = {i["name"]: i["datatype"] for i in client.model_metadata(model, version).get("inputs", [])}
    named = inputs if isinstance(inputs, dict) else {next(iter(declared), ""): inputs}

    def cast(name: str, array: Any) -> Any:
        want = DATATYPES.get(declared.get(name, ""))
        if want is None or want.kind not in "iuf" or array.dtype.kind not in "iuf" or array.dtype == want:
            return array
        return array.astype(want)

    cast_named = {name: cast(name, array) for name, array in named.items()}
    return cast_named if isinstance(inputs, dict) else next(iter(cast_named.values()))


def _resign(folder: Path, signing_key: str) -> None:
    """The folder's files changed: sign it again when this machine holds the signing key."""
    from gateway.registry.signing import sign_model

    if Path(signing_key).is_file():
        sign_model(folder, Path(signing_key))
        print(f"re-signed {folder} with {signing_key}")
    else:
        print(f"note: {folder} changed and its signature no longer matches; sign it with `gateway models sign`")


def _reload(pid_file: str) -> int:
    """Ask the running gateway to swap in changed model versions (it verifies and admits them first)."""
    import signal

    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"gateway: no running gateway found through {pid_file}: {exc}", file=sys.stderr)
        return 1
    print(f"reload requested from gateway {pid}: changed versions are verified, admitted and swapped in "
          "once healthy; refusals keep the serving version (see its log and the audit stream 'supervisor')")
    return 0


def _calibrate(args: argparse.Namespace, config: Any, folder: Path) -> int:
    """``gateway models calibrate FOLDER --data clean.npy``: score held-out clean inputs with every
    detector and write ``calibration.json`` into the version folder; sign it again."""
    from gateway.config import GuardConfig
    from gateway.guards.calibration import calibrate_folder
    from gateway.registry.manifest import load_manifest

    if not args.data:
        print("gateway: calibrate needs --data CLEAN.npy (held-out inputs the model was not trained on)", file=sys.stderr)
        return 2
    manifest = load_manifest(folder)
    settings = config.model(manifest.name)
    guard = settings.guard if settings is not None else GuardConfig()
    squeezers = tuple(args.squeezer) or guard.squeezers
    image = tuple(int(d) for d in args.image.split("x")) if args.image else guard.image
    target = args.target_fpr if args.target_fpr is not None else guard.target_fpr
    path, doc = calibrate_folder(folder, config.supply, Path(args.data), squeezers, image, target,
                                 progress=lambda text: print(f"{manifest.name}/{manifest.version}: {text}", flush=True))
    thresholds = ", ".join(f"{k} {v:.4g}" for k, v in doc["thresholds"].items())
    print(f"wrote {path}: {doc['data']['rows']} rows, squeezers {doc['squeezers']}, at target FPR {target:g}: {thresholds}")
    _resign(folder, config.supply.signing_key)
    return 0


def _check(manifest: Manifest, supply: SupplyConfig) -> int:
    """``gateway models check``: the serving path's checks, and what bounds the model's answers."""
    from gateway.registry.admission import admit
    from gateway.registry.loading import load_model_bytes

    # as the serving path: models go to workers as bytes
    report = admit(load_model_bytes(manifest, supply), supply, None)
    bound = ("each answer held to the request's rows (batch)" if manifest.batch
             else "answers held to 256 MiB (no batch in the manifest)")
    print(f"{manifest.name}/{manifest.version}: admitted ({report.nodes} nodes, opset {report.opset}, "
          f"{report.initializer_bytes} bytes of initializers, domains {list(report.domains)}); {bound}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    """``gateway models pull --from DIR``: deliver signed versions into ``models.root``, verified.
    With ``--to`` and ``--trusted-key`` it needs no configuration (an init container holds only
    the public key, not the gateway's certificates)."""
    from gateway.registry.pull import PullError, pull_models

    if args.to and args.trusted_key:
        root, keys = Path(args.to), [Path(k) for k in args.trusted_key]
    else:
        config = load(args)
        root = Path(args.to or config.models_root)
        keys = [Path(k) for k in (args.trusted_key or config.supply.trusted_keys)]
    try:
        results = pull_models(Path(args.source), root, keys,
                              progress=lambda r: print(f"{r.name}/{r.version}: {r.outcome}", flush=True))
    except PullError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    refused = [r for r in results if r.outcome.startswith("refused")]
    if not results:
        print(f"gateway: no model version (<name>/<version>/manifest.json) under {args.source}", file=sys.stderr)
        return 1
    print(f"{len(results) - len(refused)} of {len(results)} version(s) in {root}"
          + (f"; {len(refused)} refused" if refused else ""))
    return 1 if refused else 0


def _cmd_models(args: argparse.Namespace) -> int:
    """``sign``, ``verify``, ``check``, ``encrypt`` and ``rewrap`` a model version folder
    (``<root>/<name>/<version>``)."""
    from gateway.guards.calibration import CalibrationError
    from gateway.registry.admission import AdmissionError, admit
    from gateway.registry.manifest import ManifestError, load_manifest
    from gateway.registry.sealing import SEALED_NAME, SealError, key_provider, rewrap, seal
    from gateway.registry.signing import SignatureError, sign_model, verify_model

    if args.action == "pull":
        return _pull(args)
    config = load(args)
    supply = config.supply
    if args.action == "reload":
        return _reload(config.server.pid_file)
    folder = Path(args.folder)
    try:
        manifest = load_manifest(folder)
        if args.action == "calibrate":
            return _calibrate(args, config, folder)
        if args.action == "check":
            return _check(manifest, supply)
        if args.action == "sign":
            signature = sign_model(folder, Path(args.key or supply.signing_key))
            print(f"signed {folder} -> {signature}")
            return 0
        if args.action == "verify":
            keys = [Path(k) for k in (args.trusted_key or supply.trusted_keys)]
            key = verify_model(folder, keys)
            print(f"{manifest.name}/{manifest.version}: signature verified with {key}")
            return 0
        if args.action == "encrypt":
            plaintext = manifest.read_verified()
            admit(plaintext, supply, None)
            sealed = seal(plaintext, manifest.name, manifest.version, key_provider(supply))
            tmp = folder / (SEALED_NAME + ".tmp")
            tmp.write_bytes(sealed)
            os.replace(tmp, folder / SEALED_NAME)
            if not args.keep_plaintext:
                manifest.onnx_path.unlink()
            print(f"sealed {folder / SEALED_NAME}" + ("" if args.keep_plaintext else f"; removed {manifest.onnx_path}"))
            _resign(folder, supply.signing_key)
            return 0
        old = key_provider(supply)
        new = key_provider(supply, kek_file=args.new_kek_file)
        path = folder / SEALED_NAME
        tmp = folder / (SEALED_NAME + ".tmp")
        tmp.write_bytes(rewrap(path.read_bytes(), old, new))
        os.replace(tmp, path)
        print(f"rewrapped {path} from key {old.kek_id()} to {new.kek_id()} (the model itself was not re-encrypted)")
        _resign(folder, supply.signing_key)
        return 0
    except (ManifestError, CalibrationError, SealError, AdmissionError, SignatureError, OSError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1


def add_parsers(sub: Any) -> None:
    folder = opt("folder", help="the model version folder, <models root>/<name>/<version>")
    add_area(sub, "models", "sign, verify, check, calibrate, encrypt or rewrap a model version folder; reload; pull",
             _cmd_models, {
        "sign": ("sign the folder's files (model.sig)", [
            folder, config_opt(), opt("--key", default="", help="the EC private key (default: supply.signing_key)")]),
        "verify": ("verify the folder's signature", [
            folder, config_opt(), opt("--trusted-key", action="append", default=[],
                                      help="a public key (repeatable; default: supply.trusted_keys)")]),
        "check": ("run the admission checks the gateway runs before serving", [folder, config_opt()]),
        "calibrate": ("calibrate the adversarial-input guard on held-out clean inputs, and sign again", [
            folder, config_opt(),
            opt("--data", required=True, help="held-out clean inputs (.npy) the model was not trained on"),
            opt("--squeezer", action="append", default=[],
                help="bits:N, levels:N or median:K (repeatable; default: the model's guard.squeezers)"),
            opt("--image", default="", help="HxW or CxHxW an input row is viewed as (default: guard.image)"),
            opt("--target-fpr", type=float, default=None,
                help="false-positive rate the recorded thresholds are placed at (default: guard.target_fpr; "
                     "the gateway places its own from the scores)")]),
        "encrypt": ("seal model.onnx with the key-encryption key, and sign again", [
            folder, config_opt(), opt("--keep-plaintext", action="store_true", help="do not remove model.onnx")]),
        "rewrap": ("wrap the sealed model's key with a new key-encryption key, and sign again", [
            folder, config_opt(), opt("--new-kek-file", required=True, help="the new key-encryption key")]),
        "reload": ("ask the running gateway to verify, admit and swap in changed versions", [config_opt()]),
        "pull": ("copy signed versions from a delivery folder into models.root, verified before they appear", [
            opt("--from", dest="source", required=True,
                help="a model repository (<name>/<version>/...), e.g. a volume mounted read-only"),
            opt("--to", default="", help="the serving model root (default: the configuration's models.root)"),
            opt("--trusted-key", action="append", default=[],
                help="a public key (repeatable; default: supply.trusted_keys); with --to, no configuration is read"),
            config_opt()]),
    })

    p = sub.add_parser("infer", help="run one inference through the SDK", description="run one inference through the SDK",
                       epilog="exit codes: 0 answered, 1 failed, 2 a mistake in the command (a file, the "
                              "credentials), 3 no such model, 4 refused by the gateway")
    p.add_argument("model", help="the model's name")
    p.add_argument("--input", required=True, help=".npy (one input), .npz (named inputs) or .json (array or {name: array})")
    p.add_argument("--version", default=None, help="a version of the model (default: the one served)")
    p.add_argument("--credentials", default="credentials.json", help="written by `gateway init`")
    p.add_argument("--principal", default="demo", help="whose entry in the credentials file")
    p.add_argument("--output", default="", help="save the outputs to this .npz instead of printing them")
    p.add_argument("-o", "--format", default="json", choices=["json", "yaml"], help="how to print the outputs")
    p.add_argument("--json-tensors", "--json", dest="json_tensors", action="store_true",
                   help="send the inputs as JSON tensors instead of binary ones (--json is the old name)")
    p.add_argument("--deadline", type=float, default=30.0, help="seconds for the call, retries included")
    p.set_defaults(func=_cmd_infer)
