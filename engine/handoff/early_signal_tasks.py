"""Early-signal cloze suite for lighteval 0.13 (custom tasks file written by `engine export lighteval`).

Small-model ablations (~1-2 B parameters, ~20 B tokens) score near chance on multiple-choice letter
formats; the cloze formulation (the model's log-likelihood of each answer's text after the question,
normalised by its length in characters) gives signal early in training. Tasks: ARC (easy, challenge),
HellaSwag, PIQA, SIQA, OpenBookQA, Winogrande, CommonsenseQA, and a sample of MMLU; all zero-shot.

- HellaSwag: lighteval's own cloze template (`get_hellaswag_prompt_function`, CF formulation), so
  the WikiHow artifacts ([title], [header], [step] ...) are cleaned as in lm-eval-harness.
- PIQA and SIQA: their hub repositories hold loading scripts, which datasets >= 4 (lighteval 0.13's)
  refuses and lighteval aborts the whole run on; they are read from the hub's own Parquet
  conversion of the same data (`refs/convert/parquet`, subset `default`).
- `mmlu_sample_cf` is *not* MMLU as published: a seeded `--max-samples` sample of `cais/mmlu`'s
  `all` test set, one accuracy over every question drawn (subjects weighted by their size), not the
  per-subject average of lighteval's 57 `mmlu` tasks. Comparable between our runs only.

    lighteval accelerate "model_name=CHECKPOINT,dtype=bfloat16" TASKS.txt --custom-tasks THIS_FILE \
        --max-samples 1000 --output-dir RESULTS

EARLY_SIGNAL_DATA=/dir reads every task from /dir/<task name>/ (jsonl or parquet files named after
their split, in the hub dataset's columns) instead of the hub: an offline mirror, or tiny test data.
This file is standalone: it imports lighteval only.
"""
import os

import numpy as np
from lighteval.metrics.metrics_sample import LoglikelihoodAcc
from lighteval.metrics.normalizations import LogProbCharNorm
from lighteval.metrics.utils.metric_utils import SampleLevelMetric
from lighteval.tasks.lighteval_task import LightevalTaskConfig
from lighteval.tasks.requests import Doc, SamplingMethod
from lighteval.tasks.templates.hellaswag import get_hellaswag_prompt_function
from lighteval.tasks.templates.utils.formulation import CFFormulation
from lighteval.utils.language import Language

LOCAL = os.environ.get("EARLY_SIGNAL_DATA")
# accuracy of the highest log-likelihood answer, normalised by the answer's length in characters
ACC_NORM = SampleLevelMetric(metric_name="acc_norm", sample_level_fn=LoglikelihoodAcc(LogProbCharNorm()),
                             category=SamplingMethod.LOGPROBS, corpus_level_fn=np.mean, higher_is_better=True)


def _doc(task_name, query, choices, gold):
    return Doc(task_name=task_name, query=query, choices=[" " + c.strip() for c in choices], gold_index=gold)


def arc(line, task_name=None):
    labels = list(line["choices"]["label"])
    return _doc(task_name, f"Question: {line['question']}\nAnswer:", line["choices"]["text"],
                labels.index(line["answerKey"]))


# lighteval's standard cloze HellaSwag: its WikiHow clean-up, capitalisation and punctuation fixes
hellaswag = get_hellaswag_prompt_function(
    Language.ENGLISH,
    lambda line: {"activity_label": line["activity_label"], "ctx_a": line["ctx_a"], "ctx_b": line["ctx_b"],
                  "continuations": line["endings"], "gold_idx": int(line["label"])},
    formulation=CFFormulation(), wikihow_artifacts=[" [title]"])


def piqa(line, task_name=None):
    return _doc(task_name, f"Question: {line['goal']}\nAnswer:", [line["sol1"], line["sol2"]], int(line["label"]))


def siqa(line, task_name=None):
    return _doc(task_name, f"{line['context']}\nQuestion: {line['question']}\nAnswer:",
                [line["answerA"], line["answerB"], line["answerC"]], int(line["label"]) - 1)


def openbookqa(line, task_name=None):
    labels = list(line["choices"]["label"])
    return _doc(task_name, f"Question: {line['question_stem']}\nAnswer:", line["choices"]["text"],
                labels.index(line["answerKey"].strip()))


def winogrande(line, task_name=None):
    # cloze over the blank: the sentence up to it is the context, each option plus the rest a choice
    before, after = line["sentence"].split("_", 1)
    options = [line["option1"], line["option2"]]
    return Doc(task_name=task_name, query=before.rstrip(), choices=[f" {o}{after}" for o in options],
               gold_index=int(line["answer"]) - 1)


def commonsenseqa(line, task_name=None):
    labels = list(line["choices"]["label"])
    return _doc(task_name, f"Question: {line['question']}\nAnswer:", line["choices"]["text"],
                labels.index(line["answerKey"].strip()))


def mmlu(line, task_name=None):
    subject = line.get("subject", "").replace("_", " ")
    head = f"The following are questions about {subject}.\n" if subject else ""
    return _doc(task_name, f"{head}Question: {line['question']}\nAnswer:", line["choices"], int(line["answer"]))


PARQUET = "refs/convert/parquet"  # the hub's Parquet conversion of a script dataset


def _task(name, prompt, repo, subset, split, revision=None):
    return LightevalTaskConfig(
        name=name, prompt_function=prompt,
        hf_repo=os.path.join(LOCAL, name) if LOCAL else repo, hf_subset=None if LOCAL else subset,
        hf_revision=None if LOCAL else revision,
        hf_avail_splits=[split], evaluation_splits=[split], few_shots_split=None, few_shots_select=None,
        generation_size=-1, metrics=[ACC_NORM], stop_sequence=["\n"], version=0,
    )


TASKS_TABLE = [
    _task("arc_cf_easy", arc, "allenai/ai2_arc", "ARC-Easy", "test"),
    _task("arc_cf_challenge", arc, "allenai/ai2_arc", "ARC-Challenge", "test"),
    _task("hellaswag_cf", hellaswag, "Rowan/hellaswag", "default", "validation"),
    _task("piqa_cf", piqa, "ybisk/piqa", "default", "validation", PARQUET),
    _task("siqa_cf", siqa, "allenai/social_i_qa", "default", "validation", PARQUET),
    _task("openbookqa_cf", openbookqa, "allenai/openbookqa", "main", "test"),
    _task("winogrande_cf", winogrande, "allenai/winogrande", "winogrande_xl", "validation"),
    _task("commonsenseqa_cf", commonsenseqa, "tau/commonsense_qa", "default", "validation"),
    _task("mmlu_sample_cf", mmlu, "cais/mmlu", "all", "test"),
]
