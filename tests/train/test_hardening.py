

def test_export_into_an_existing_folder_is_refused(tmp_path: Path) -> None:
    from train.trainer import export_checkpoint

    make_step(tmp_path / "run" / "checkpoints", 6)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    cfg = load_run_config("tiny", [f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(Exception, match="export destination .*mine exists: pass --force"):
        export_checkpoint(cfg, "auto", str(dest))
    assert (dest / "notes.txt").read_text() == "keep me"
