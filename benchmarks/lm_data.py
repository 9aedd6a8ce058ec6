"""Build data/lm: the task folders of ``specmerge bench lm`` from public datasets kept in GitHub
repositories, each read at a pinned commit (data/lm/README.md describes the format).

    python benchmarks/lm_data.py --repo openai/grade-school-math=PATH \\
        --repo arkilpatel/SVAMP=PATH --repo zhaoxlpku/HKU-DASC7606-A2=PATH \\
        --repo pytorch/examples=PATH [--out data/lm]

Each PATH is a clone (or bare mirror) holding the pinned commit of SOURCES below; files are read
with ``git show COMMIT:FILE``, so the working tree does not matter. The two instruction-style
tasks are built from data/text of this repository. Subsamples use ``random.Random(0)``; running
the script twice writes the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import subprocess
from pathlib import Path

from specmerge.bench.lm_tasks import format_number

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, N_TEST = 500, 100, 200
N_PPL = 40  # paragraphs of general text for perplexity
SOURCES = {
    "openai/grade-school-math": ("3101c7d5072418e28b9008a6636bde82a006892c", "MIT"),
    "arkilpatel/SVAMP": ("689d7ccac74b9983a2ac7cc3b264f441b99e7c53", "MIT"),
    # a course's copy of AI2's ARC-Easy (the dataset's licence is CC BY-SA 4.0)
    "zhaoxlpku/HKU-DASC7606-A2": ("fcca017f3468a25901ad298913e976c42ad9165e", "CC BY-SA 4.0"),
    "pytorch/examples": ("77f55b912142e11fcfdf5b530231fb9c52f181e8", "CC BY-SA 3.0 (WikiText)"),
}


class Git:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos

    def read(self, repo: str, path: str) -> str:
        if repo not in self.repos:
            raise SystemExit(f"pass --repo {repo}=PATH (a clone holding {SOURCES[repo][0]})")
        return subprocess.run(["git", "-C", str(self.repos[repo]), "show",
                               f"{SOURCES[repo][0]}:{path}"], check=True, capture_output=True,
                              text=True).stdout


def split(rows: list, n_train: int, n_val: int, n_test: int | None = None) -> tuple:
    """Seeded disjoint (train, validation[, test]) subsamples of one pool."""
    rows = list(rows)
    random.Random(0).shuffle(rows)
    out = (rows[:n_train], rows[n_train:n_train + n_val])
    if n_test is not None:
        out += (rows[n_train + n_val:n_train + n_val + n_test],)
    return out


def sample(rows: list, n: int) -> list:
    rows = list(rows)
    random.Random(0).shuffle(rows)
    return rows[:n]


def detok(s: str) -> str:
    """Undo the space-before-punctuation tokenisation of the older datasets."""
    s = re.sub(r" ([,.?!;:%])", r"\1", s)
    return re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s).strip()


def qa(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def arithmetic(expr: str, value: float) -> str:
    v = format_number(value)
    return f"{expr} = {v}\nThe answer is {v}."


# --------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------

def gsm8k(git: Git) -> dict:
    def row(d: dict) -> dict:
        sol, ans = d["answer"].split("####")
        ans = format_number(float(ans.strip().replace(",", "")))
        # no blank line inside a target: a continuation ends at the first one
        steps = re.sub(r"\n\s*\n", "\n", re.sub(r"<<[^>]*>>", "", sol)).strip()
        return {"prompt": qa(d["question"]), "target": f"{steps}\nThe answer is {ans}.",
                "answer": ans}

    read = lambda f: [json.loads(x) for x in git.read(  # noqa: E731
        "openai/grade-school-math", f"grade_school_math/data/{f}").splitlines() if x.strip()]
    train, val = split([row(d) for d in read("train.jsonl")], N_TRAIN, N_VAL)
    return {"kind": "generate", "max_new_tokens": 256, "train": train, "validation": val,
            "test": sample([row(d) for d in read("test.jsonl")], N_TEST),
            "description": "grade-school maths word problems, worked solution then the answer",
            "source": ("openai/grade-school-math", "grade_school_math/data/{train,test}.jsonl")}


def _infix(expr: str) -> str:
    """SVAMP's bracketed equation "( 76.0 - 25.0 )" without the outer brackets and ".0"."""
    s = re.sub(r"(\d+)\.0\b", r"\1", expr.strip())
    s = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", s))
    return s[1:-1] if s.startswith("(") and s.endswith(")") and s.count("(") == 1 else s


def svamp(git: Git) -> dict:
    rows = [{"prompt": qa(f"{d['Body'].strip()} {d['Question'].strip()}"),
             "target": arithmetic(_infix(d["Equation"]), d["Answer"]),
             "answer": format_number(d["Answer"])}
            for d in json.loads(git.read("arkilpatel/SVAMP", "SVAMP.json"))]
    train, val, test = split(rows, N_TRAIN, N_VAL, N_TEST)
    return {"kind": "generate", "max_new_tokens": 48, "train": train, "validation": val,
            "test": test, "description": "one- and two-step arithmetic word problems (SVAMP)",
            "source": ("arkilpatel/SVAMP", "SVAMP.json")}


def _prefix_to_infix(tokens: list[str], numbers: list[float]) -> tuple[str, float]:
    """MAWPS's prefix equation ("* number0 number1") as infix text and its value."""
    def walk(i: int) -> tuple[str, float, int]:
        t = tokens[i]
        if t in "+-*/":
            a, va, j = walk(i + 1)
            b, vb, k = walk(j)
            v = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb}[t]
            return f"({a} {t} {b})", v, k
        v = numbers[int(t[6:])] if t.startswith("number") else float(t)
        return format_number(v), v, i + 1

    text, value, _ = walk(0)
    return (text[1:-1] if text.startswith("(") else text), value


def mawps(git: Git) -> dict:
    def rows(fname: str) -> list[dict]:
        out = []
        for d in csv.DictReader(io.StringIO(git.read("arkilpatel/SVAMP",
                                                     f"data/cv_mawps/fold0/{fname}"))):
            nums = [float(x) for x in d["Numbers"].split()]
            q = re.sub(r"number(\d+)", lambda m, nums=nums: format_number(nums[int(m.group(1))]),
                       d["Question"])
            expr, value = _prefix_to_infix(d["Equation"].split(), nums)
            if abs(value - float(d["Answer"])) > 1e-4 * max(1.0, abs(value)):
                continue  # an equation that does not give the stated answer
            out.append({"prompt": qa(detok(q)), "target": arithmetic(expr, value),
                        "answer": format_number(float(d["Answer"]))})
        return out

    train, val = split(rows("train.csv"), N_TRAIN, N_VAL)
    return {"kind": "generate", "max_new_tokens": 48, "train": train, "validation": val,
            "test": sample(rows("dev.csv"), N_TEST),
            "description": "arithmetic word problems (MAWPS, fold 0 of SVAMP's 5-fold split)",
            "source": ("arkilpatel/SVAMP", "data/cv_mawps/fold0/{train,dev}.csv")}


def arc_easy(git: Git) -> dict:
    def rows(split_name: str) -> list[dict]:
        out = []
        for x in git.read("zhaoxlpku/HKU-DASC7606-A2",
                          f"data/ARC-Easy-{split_name}.jsonl").splitlines():
            if x.strip():
                d = json.loads(x)
                labels = d["choices"]["label"]
                out.append({"prompt": qa(d["question"]), "choices": d["choices"]["text"],
                            "label": labels.index(d["answerKey"])})
        return out

    return {"kind": "choice", "train": sample(rows("train"), N_TRAIN),
            "validation": sample(rows("validation"), N_VAL), "test": sample(rows("test"), N_TEST),
            "description": "grade-school science questions, 3 to 5 choices (ARC-Easy)",
            "source": ("zhaoxlpku/HKU-DASC7606-A2", "data/ARC-Easy-{train,validation,test}.jsonl")}


def _from_text(task: str, prompt: str, choices: list[str], description: str) -> dict:
    d = REPO / "data" / "text" / task
    read = lambda f: [json.loads(x) for x in (d / f).read_text("utf-8").split("\n")  # noqa: E731
                      if x.strip()]
    row = lambda r: {"prompt": prompt.format(detok(r["text"])), "choices": choices,  # noqa: E731
                     "label": r["label"]}
    if (d / "validation.jsonl").is_file():
        train, val = sample(read("train.jsonl"), N_TRAIN), sample(read("validation.jsonl"), N_VAL)
    else:
        train, val = split(read("train.jsonl"), N_TRAIN, N_VAL)
    return {"kind": "choice", "train": [row(r) for r in train], "validation": [row(r) for r in val],
            "test": [row(r) for r in sample(read("test.jsonl"), N_TEST)],
            "description": description, "source": ("specmerge data/text", f"data/text/{task}")}


def sst2(_: Git) -> dict:
    return _from_text("sst2", "Review: {}\nIs this movie review positive or negative?\nAnswer:",
                      ["negative", "positive"], "movie-review sentiment as a question (SST-2)")


def agnews(_: Git) -> dict:
    return _from_text("agnews", "Article: {}\nIs this article about world, sports, business or "
                      "science and technology?\nAnswer:",
                      ["world", "sports", "business", "science and technology"],
                      "news topic as a question (AG News)")


def trec(_: Git) -> dict:
    return _from_text("trec", "Question: {}\nDoes this question ask for a description, an "
                      "entity, an abbreviation, a person, a location or a number?\nAnswer:",
                      ["description", "entity", "abbreviation", "person", "location", "number"],
                      "the answer type of a question, asked as a question (TREC-6)")


def subj(_: Git) -> dict:
    return _from_text("subj", "Sentence: {}\nIs this sentence from a plot summary (objective) "
                      "or from a review (subjective)?\nAnswer:", ["objective", "subjective"],
                      "subjectivity of a movie sentence as a question (SUBJ)")


TASKS = {"arc_easy": arc_easy, "gsm8k": gsm8k, "svamp": svamp, "mawps": mawps,
         "sst2_qa": sst2, "agnews_qa": agnews, "trec_qa": trec, "subj_qa": subj}


def perplexity_sample(git: Git) -> list[dict]:
    """The first N_PPL WikiText-2 test paragraphs without ``<unk>``, detokenised."""
    text = git.read("pytorch/examples", "word_language_model/data/wikitext-2/test.txt")
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("=") or "<unk>" in s or len(s) < 200:
            continue
        s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        out.append({"text": detok(s.replace(" ( ", " (").replace(" ) ", ") ").replace(' " ', ' "'))})
        if len(out) == N_PPL:
            break
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=PATH")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "lm")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--no-perplexity", action="store_true",
                    help="do not rewrite perplexity.jsonl (it needs pytorch/examples)")
    args = ap.parse_args()
    git = Git({k: Path(v) for k, v in (r.split("=", 1) for r in args.repo)})
    for name in args.tasks.split(","):
        spec = TASKS[name](git)
        d = args.out / name
        d.mkdir(parents=True, exist_ok=True)
        repo, files = spec.pop("source")
        commit, licence = SOURCES.get(repo, ("this repository", "see data/text/README.md"))
        meta = {"kind": spec.pop("kind"), "description": spec.pop("description"),
                **({"max_new_tokens": spec.pop("max_new_tokens")} if "max_new_tokens" in spec
                   else {}),
                "source": {"repository": repo, "commit": commit, "files": files,
                           "licence": licence}}
        (d / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
        for split_name, rows in spec.items():
            write_jsonl(d / f"{split_name}.jsonl", rows)
        print(name, {k: len(v) for k, v in spec.items()})
    if not args.no_perplexity:
        write_jsonl(args.out / "perplexity.jsonl", perplexity_sample(git))


if __name__ == "__main__":
    main()
