"""`timm-layerattn push`: upload an exported folder to a Hugging Face Hub model repo."""
import argparse

__all__ = ['add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('folder', help='folder written by `timm-layerattn export`')
    parser.add_argument('--repo-id', required=True,
                        help='target repo, <org-or-user>/<name>, e.g. acme/resnet50_kcla.in1k')
    parser.add_argument('--private', action='store_true', help='create the repo as private (if it does not exist)')
    parser.add_argument('--revision', default=None, help='branch to commit to (created if missing; default main)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing directly')
    parser.add_argument('--commit-message', default=None)
    parser.add_argument('--dry-run', action='store_true', help='validate the folder and print what would be uploaded')


def run(args: argparse.Namespace) -> int:
    from .. import models  # noqa: F401  (registers the architectures)
    from ..hub import push_folder
    push_folder(
        args.folder, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
        commit_message=args.commit_message, create_pr=args.create_pr)
    return 0
