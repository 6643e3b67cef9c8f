"""
The study: train a baseline and every dedicated sink option on the same data, token budget and seeds, with
tracking on, then write one report (table + overlaid curves) that says whether a dedicated sink replaces the
emergent one.

    python study.py config/study/bb.py                 # run (or resume) every variant x seed, then report
    python study.py config/study/bb.py --report_only   # only rebuild the report from finished runs
    python study.py config/study/bb.py --dry_run       # print the train.py commands
    python study.py config/study/bb.py --only base,logit --train_only   # these variants (e.g. one per process)

A study config is plain Python assignments (the keys of STUDY_DEFAULTS in sinkgpt/study_runner.py). Runs go to out_root/<variant>/seed<N>; a run
that finished is skipped, one with a checkpoint resumes, so an interrupted study picks up where it stopped.
"""

import argparse
import sys

from sinkgpt.common import InputError
from sinkgpt.study_runner import analysis_device, load_study, train_all, write_report


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--only", help="comma-separated variants to train (default: all)")
    parser.add_argument("--train_only", action="store_true", help="train, but leave the report for later")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.config)
        if not args.dry_run and not args.train_only:
            analysis_device(study)  # a device this machine lacks is said before the training, not after it
        if not args.report_only:
            train_all(study, args.dry_run, only=args.only.split(",") if args.only else None)
        if not args.dry_run and not args.train_only:
            write_report(study, args.config)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the running train.py got the same Ctrl-C and saved its checkpoint first
        print(f"interrupted: rerun `python study.py {args.config}` to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
