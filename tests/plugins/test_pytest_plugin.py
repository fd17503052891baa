"""The pytest fixtures lmserve ships for plugin authors, used the way an author's test file would."""

pytest_plugins = ["pytester"]


def test_the_fixtures_reach_a_plugin_authors_tests_through_the_entry_point(pytester):
    """A test file that only names the fixtures (no conftest, no import of
    lmserve's tests) runs against the engine, a live server and a client."""
    pytester.makepyfile(test_my_plugin="""
        import json

        def test_the_tiny_model_is_an_hf_directory(lmserve_tiny_model_dir):
            config = json.loads((lmserve_tiny_model_dir / "config.json").read_text())
            assert config["architectures"] == ["LlamaForCausalLM"]
            assert (lmserve_tiny_model_dir / "tokenizer.json").is_file()

        def test_the_engine_generates_greedily(lmserve_engine):
            first = lmserve_engine.generate("The quick brown fox", max_tokens=4, ignore_eos=True)
            second = lmserve_engine.generate("The quick brown fox", max_tokens=4, ignore_eos=True)
            assert len(first.token_ids) == 4 and first.finish_reason == "length"
            assert first == second

        def test_the_client_talks_to_the_live_server(lmserve_client):
            assert lmserve_client.get("/health").status_code == 200
            reply = lmserve_client.post("/v1/completions", json={
                "model": "tiny", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 3

        def test_the_factory_passes_arguments_and_environment(lmserve_server_factory):
            server = lmserve_server_factory("--model-name", "other", env={"LMSERVE_API_KEYS": "secret"})
            with server.client(headers={"Authorization": "Bearer secret"}) as client:
                assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["other"]
            with server.client() as client:
                assert client.get("/v1/models").status_code == 401
    """)
    # A subprocess, as a plugin author's run would be: the fixtures come from
    # the installed entry point alone, and its servers are not this run's.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=4)


def test_the_plugin_adds_fixtures_only(pytester, pytestconfig):
    """Loaded into every test run of the environment, it must change nothing
    else: no hook implementations, only ``lmserve_``-prefixed fixtures."""
    pytester.makepyfile(test_nothing="def test_nothing(): pass")
    result = pytester.runpytest_subprocess("--fixtures", "-q")
    names = [line.split()[0] for line in result.outlines if line.startswith("lmserve_")]
    assert sorted(names) == ["lmserve_client", "lmserve_engine", "lmserve_server",
                             "lmserve_server_factory", "lmserve_tiny_model_dir"]
    import lmserve.plugins.pytest_plugin as plugin

    assert pytestconfig.pluginmanager.get_plugin("lmserve") is plugin  # this run loaded it too
    assert not [name for name in vars(plugin) if name.startswith("pytest_")]
