"""Run nanotron's own code (the pinned commit, vendored in tests/vendor) on an `engine export nanotron`
directory, the way nanotron's run_train.py does, and print what it saw as JSON. Run from the export
directory (its paths are relative to it), in a subprocess (import stubs, a process group):

    python tests/nanotron_check.py NANOTRON_SRC DATATROVE_DATASET_PY [--past-end] [--wrap]

- flash_attn and triton are import-only stubs (nanotron imports them at module level; nothing here
  calls them), transformers is imported before they are installed (it probes flash_attn);
- datatrove's `datatrove.utils.dataset` is the pinned branch's file (2c895af7), over the installed
  datatrove, because that is the signature nanotron calls;
- torch.distributed is a one-process gloo group (nanotron's logging and BlendableDataset ask for it);
  BlendableDataset gets the one attribute of nanotron's ParallelContext it uses (`world_pg`), and
  compiles nanotron's C++ blending helper itself (make + pybind11), as on a cluster.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import types


class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Dummy()

    def __getattr__(self, name):
        return _Dummy()


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    ROOTS = ("flash_attn", "triton")

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.ROOTS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__, m.__version__ = [], "2.7.0"
        m.__getattr__ = lambda attr: _Dummy
        return m

    def exec_module(self, module):
        pass


def main() -> None:
    nanotron_src, dataset_py = sys.argv[1], sys.argv[2]
    flags = set(sys.argv[3:])
    from transformers import AutoTokenizer, GenerationMixin  # noqa: F401 - before the stubs

    sys.meta_path.insert(0, StubFinder())
    import datatrove.utils

    spec = importlib.util.spec_from_file_location("datatrove.utils.dataset", dataset_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules["datatrove.utils.dataset"] = module
    spec.loader.exec_module(module)
    datatrove.utils.dataset = module
    sys.path.insert(0, nanotron_src)

    import torch.distributed as td
    td.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)

    from nanotron.config import get_config_from_file
    from nanotron.data.tokenized_bytes import build_dataset

    out: dict = {}
    cfg = get_config_from_file("nanotron.yaml")  # nanotron's loader: dacite strict, its own cross-checks
    out["config"] = [type(cfg).__name__, type(cfg.model.model_config).__name__,
                     type(cfg.data_stages[0].data.dataset).__name__]
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer.tokenizer_name_or_path)  # as run_train.py loads it
    out["tokenizer"] = {"name": cfg.tokenizer.tokenizer_name_or_path, "eos_id": tok.eos_token_id, "len": len(tok)}
    d = cfg.data_stages[0].data.dataset
    tokens = cfg.tokens
    global_batch = tokens.micro_batch_size * tokens.batch_accumulation_per_replica * cfg.parallelism.dp
    train_samples = tokens.train_steps * global_batch

    def build(folder, old=None):  # exactly the call of nanotron's get_tb_datasets
        return build_dataset(folder, tokens.sequence_length, token_size=d.token_size_in_bytes,
                             return_positions=d.return_positions, eos_token_id=tok.eos_token_id,
                             use_old_brrr_dataloader=d.use_old_brrr_dataloader if old is None else old,
                             skip_in_stream=d.skip_in_stream, max_tokens=None, num_samples=train_samples,
                             shuffle=False, seed=cfg.data_stages[0].data.seed, folder_read_path=None)

    datasets = [build(f) for f in d.dataset_folder]
    out["folders"] = {f: len(ds) for f, ds in zip(d.dataset_folder, datasets)}
    from nanotron.data.nemo_dataset import BlendableDataset

    blend = BlendableDataset(datasets, d.dataset_weights, train_samples,
                             parallel_context=types.SimpleNamespace(world_pg=td.group.WORLD),
                             seed=cfg.data_stages[0].data.seed)
    out["drawn"] = [int(x) for x in blend.dataset_num_samples]
    samples, bad_positions, eos_seen = 0, 0, 0
    for i in range(len(blend)):  # every sample training draws
        item = blend[i]
        ids, pos = item["input_ids"].tolist(), item.get("positions")
        samples += 1
        if len(ids) != tokens.sequence_length + 1:
            raise AssertionError(f"sample {i}: {len(ids)} tokens")
        if pos is not None and not d.use_old_brrr_dataloader:
            pos = pos.tolist()
            for j in range(len(ids) - 1):
                if ids[j] == tok.eos_token_id:
                    eos_seen += 1
                    bad_positions += pos[j + 1] != 0  # a document starts after every separator
                elif pos[j + 1] != pos[j] + 1:
                    bad_positions += 1
    out["samples_read"], out["bad_positions"], out["separators_seen"] = samples, bad_positions, eos_seen
    blend.update_consumption_metrics(0, len(blend), tokens.sequence_length)
    out["consumption"] = {k: v["tokens"] for k, v in blend.get_consumption_stats().items()}  # after each step
    if "--past-end" in flags:  # what training does when a folder runs out
        try:
            datasets[0][len(datasets[0])]
            out["past_end"] = "read"
        except IndexError as exc:
            out["past_end"] = f"IndexError: {exc}"
    if "--wrap" in flags:
        old = build(d.dataset_folder[0], old=True)
        out["old_loader"] = {"len": len(old), "wraps": bool((old[len(old)]["input_ids"] == old[0]["input_ids"]).all())}
    print("NANOTRON_CHECK " + json.dumps(out))


if __name__ == "__main__":
    main()
