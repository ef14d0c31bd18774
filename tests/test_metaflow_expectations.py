"""Flows ported from Metaflow behave as a Metaflow user expects (issue 16), end
to end through the real `flowmagic` console command."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime_helpers import artifacts, flowmagic, flowmagic_json, write_notebook


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


# --- sibling writers (item 1) ------------------------------------------------------

SIBLINGS = [
    "%%step start\nitems = [1, 2, 3, 4]",
    "%%step pick_even\nresult = [x for x in items if x % 2 == 0]",
    "%%step pick_odd\nresult = [x for x in items if x % 2]\nfirst_odd = result[0]",
    "%%step join\nevens = result",
]


@pytest.mark.parametrize("command", ["run", "show"])
def test_sibling_writers_are_refused_and_nothing_is_recorded(tmp_path, store, command):
    nb = write_notebook(tmp_path / "siblings.ipynb", SIBLINGS)
    proc = flowmagic(command, nb, store=store)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for words in ("step 'join'", "'result'", "'pick_even' (cell 2, line 2)", "'pick_odd' (cell 3, line 2)",
                  "Rename it", "--after pick_even"):
        assert words in message
    assert flowmagic_json("status", nb, store=store)["runs"] == []


def test_show_warns_about_an_output_a_sibling_shadows(tmp_path, store):
    nb = write_notebook(tmp_path / "shadow.ipynb", SIBLINGS[:3] + ["%%step join\nodd = first_odd"])
    proc = flowmagic("show", nb, store=store)
    assert proc.returncode == 0, proc.stderr
    assert "warning: step 'pick_even' (cell 2, line 2) writes 'result', which no step reads" in proc.stdout
    assert flowmagic_json("run", nb, store=store)["status"] == "succeeded"
    assert artifacts(store, "Shadow", 1, "join")[0]["odd"] == 1


# --- ordering without data (item 2) ----------------------------------------------

# Metaflow's HelloFlow (tutorials/00-helloworld/helloworld.py), ported.
HELLO = [
    "%%step start\n# This is the 'start' step.\nimport time\ntime.sleep(0.5)\nprint('HelloFlow is starting.')",
    "%%step hello --after start\n# A step for metaflow to introduce itself.\nprint('Metaflow says: Hi!')",
    "%%step end --after hello\n# This is the 'end' step.\nprint('HelloFlow is all done.')",
]


def test_hello_flow_with_after_runs_start_hello_end_in_order(tmp_path, store):
    nb = write_notebook(tmp_path / "hello_flow.ipynb", HELLO)
    shown = flowmagic_json("show", nb, store=store)
    assert [(e["from"], e["to"], e["variables"]) for e in shown["edges"]] == \
        [("start", "hello", []), ("hello", "end", [])]
    assert "warning" not in flowmagic("show", nb, store=store).stdout
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stderr
    said = [proc.stdout.index(w) for w in ("HelloFlow is starting.", "Metaflow says: Hi!", "HelloFlow is all done.")]
    assert said == sorted(said), proc.stdout


def test_hello_flow_without_after_is_warned_about(tmp_path, store):
    unordered = [c.replace(" --after start", "").replace(" --after hello", "") for c in HELLO]
    nb = write_notebook(tmp_path / "hello_flow.ipynb", unordered)
    proc = flowmagic("show", nb, store=store)
    assert proc.returncode == 0
    assert "share no data with any other step" in proc.stdout and "--after" in proc.stdout


# --- run.data as Metaflow users know it (item 3) ---------------------------------

MOVIES_CSV = ("movie_title,title_year,genres,gross\n"
              "Avatar,2009,Action|Adventure|Fantasy|Sci-Fi,760505847\n"
              "Spectre,2015,Action|Adventure|Thriller,200074175\n"
              "Alien,1979,Horror|Sci-Fi,78900000\n"
              "Heat,1995,Action|Crime|Drama|Thriller,67436818\n"
              "Arrival,2016,Drama|Mystery|Sci-Fi,100546139\n")

# Metaflow's PlayListFlow (tutorials/01-playlist/playlist.py), ported: IncludeFile becomes
# a string the start step binds; the local `movies` of bonus_movie is `_movies` (a private
# name: Metaflow's own flow would hit the sibling-writer refusal otherwise).
PLAYLIST = [
    "%load_ext flowmagic",
    "import random",
    "%%params\ngenre = 'Sci-Fi'  # Filter movies for a particular genre.\n"
    "recommendations = 2  # The number of movies to recommend in the playlist.",
    f"%%step start\n# Parse the CSV file and load the values into a dictionary of lists.\n"
    f"movie_data = {MOVIES_CSV!r}\n"
    "columns = ['movie_title', 'title_year', 'genres', 'gross']\n"
    "dataframe = dict((column, list()) for column in columns)\n"
    "for line in movie_data.split('\\n')[1:]:\n"
    "    if not line:\n        continue\n"
    "    for column, value in zip(columns, line.split(',')):\n"
    "        dataframe[column].append(value)",
    "%%step bonus_movie\n# This step chooses a random movie from a different genre.\n"
    "_movies = [(movie, genres) for movie, genres in zip(dataframe['movie_title'], dataframe['genres'])\n"
    "           if genre.lower() not in genres.lower()]\n"
    "random.seed(5)\nbonus = random.choice(_movies)",
    "%%step genre_movies\n# Filter the movies by genre.\n"
    "movies = [dataframe['movie_title'][i] for i, g in enumerate(dataframe['genres'])\n"
    "          if genre.lower() in g.lower()]\n"
    "random.seed(7)\nrandom.shuffle(movies)",
    "%%step join\n# Join our parallel branches and merge results.\n"
    "playlist = movies[:recommendations]",
    "%%step end --after join\n# Print out the playlist and bonus movie.\n"
    "print('Playlist for movies in genre', genre)\n"
    "for pick, movie in enumerate(playlist):\n    print('Pick %d: %s' % (pick + 1, movie))\n"
    "print('Bonus Pick: %s from %s' % (bonus[0], bonus[1]))",
]


def test_run_data_is_the_namespace_run_all_leaves_on_the_playlist_port(tmp_path, store):
    from flowmagic import Run

    nb = write_notebook(tmp_path / "play_list_flow.ipynb", PLAYLIST)
    doc = flowmagic_json("run", nb, "--genre", "Drama", store=store)
    assert doc["status"] == "succeeded"
    data = Run(f"PlayListFlow/{doc['run_id']}", root=store).data
    assert data.genre == "Drama" and data.recommendations == 2         # parameters are names too
    assert data.movie_data == MOVIES_CSV                              # from start, three steps up
    assert sorted(data.playlist) == ["Arrival", "Heat"] and set(data.movies) == {"Heat", "Arrival"}
    assert data.bonus[0] in {"Avatar", "Spectre", "Alien"}
    assert data.dataframe["title_year"][0] == "2009"
    assert set(data) == {"genre", "recommendations", "movie_data", "columns", "dataframe", "line", "column",
                         "value", "bonus", "movies", "playlist", "pick", "movie"}
    assert "playlist" in data and data["bonus"] == data.bonus
    with pytest.raises(AttributeError, match="no artifact or parameter 'nope'.*playlist"):
        data.nope


# Read in a subprocess: metaflow reads its datastore location when it is imported.
_METAFLOW_RUN_DATA = """
import pickle, sys
import metaflow
metaflow.namespace(None)
run = metaflow.Flow(sys.argv[1]).latest_run
data = {name: getattr(run.data, name) for name in sys.argv[3:]}
with open(sys.argv[2], "wb") as out:
    pickle.dump(data, out)
"""


@pytest.mark.metaflow
def test_run_data_matches_metaflows_run_data_on_the_exported_playlist(tmp_path, store):
    import pickle
    import subprocess
    import sys

    from flowmagic import Run
    from flowmagic.export import export_notebook
    from test_export_metaflow import metaflow, metaflow_env

    nb = write_notebook(tmp_path / "play_list_flow.ipynb", PLAYLIST)
    ours = Run(f"PlayListFlow/{flowmagic_json('run', nb, store=store)['run_id']}", root=store).data
    script = tmp_path / "flow.py"
    export_notebook(nb, script)
    env = metaflow_env(tmp_path)
    done = metaflow(script, env, "run")
    assert done.returncode == 0, done.stderr[-3000:]
    names = ["genre", "recommendations", "movie_data", "dataframe", "playlist", "bonus"]
    target = tmp_path / "theirs.pickle"
    read = subprocess.run([sys.executable, "-c", _METAFLOW_RUN_DATA, "PlayListFlow", str(target), *names],
                          env=env, capture_output=True, text=True, timeout=240)
    assert read.returncode == 0, read.stderr
    theirs = pickle.loads(target.read_bytes())
    assert {name: getattr(ours, name) for name in names} == theirs


# --- content hashing for the mutation check (item 4) ---------------------------------

SALES = "%%step start\nimport numpy as np\nimport pandas as pd\n" \
    "sales = pd.DataFrame({'day': pd.to_datetime(['2024-01-01', '2024-01-02', '2024-01-03', '2024-01-04']),\n" \
    "                      'region': ['n', 's', 'n', 'e'], 'price': [1.0, None, 3.0, 4.0], 'qty': [1, 2, 3, 4]})\n" \
    "prices = np.array([1.5, 2.5, 3.5])\nlabels = ['a', 'b']"

READS = [
    SALES,
    "%%step clean\nclean = sales.dropna(subset=['price'])\nm = clean['price'] > 2\n"
    "a, b = clean[m], clean[~m]\nby_region = sales.groupby('region')['qty'].sum()\n"
    "top = prices[prices > 2]\nfirst = labels[0]\nraw = sales.values",
    "%%step report\nsummary = (len(a), len(b), int(by_region['n']), top.tolist(), first)",
]


def mutation_warnings(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "in place" in line]


def test_reading_frames_and_arrays_is_not_a_change_in_place(tmp_path, store):
    nb = write_notebook(tmp_path / "reads.ipynb", READS)
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stderr
    assert mutation_warnings(proc) == []
    assert artifacts(store, "Reads", 1, "report")[0]["summary"] == (2, 1, 4, [2.5, 3.5], "a")


@pytest.mark.parametrize("change, name", [
    ("sales.drop(columns=['qty'], inplace=True)", "sales"),
    ("sales.fillna(0, inplace=True)", "sales"),
    ("labels.append('c')", "labels"),
    ("prices.fill(0)", "prices"),
    ("sales.sort_values('qty', ascending=False, inplace=True)", "sales"),
])
def test_a_real_change_in_place_still_warns(tmp_path, store, change, name):
    nb = write_notebook(tmp_path / "mutates.ipynb", [SALES, f"%%step touch\n{change}\nn = 1"])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stderr
    assert [w for w in mutation_warnings(proc) if f"changed '{name}' in place" in w], proc.stdout + proc.stderr


# --- export fidelity (item 6d) --------------------------------------------------------

@pytest.mark.metaflow
def test_a_reserved_name_used_only_in_a_step_exports_and_runs_in_metaflow(tmp_path):
    from test_export_metaflow import export_run_and_compare

    nb = write_notebook(tmp_path / "reserved.ipynb", [
        "%%step start\nitems = ['a', 'b', 'c']\nindex = {v: i for i, v in enumerate(items)}\n"
        "name = 'lookup'\nfirst = index['b']",
        "%%step end\nout = (first, len(items))",
    ])
    ours, theirs = export_run_and_compare(nb, tmp_path)
    assert theirs[("end", None)]["out"] == ours[("end", None)]["out"] == (1, 3)
    assert "index" not in theirs[("start", None)]


# --- the --catch variable reads the same in the notebook and in Metaflow (item 6b) -----------

CATCH = [
    "%%step start\nitems = [0, 2, 4]",
    "%%step divide --foreach items --catch oops\nx = 8 / input",
    "%%step join\nmessages = [e.exception if e else None for e in oops]\n"
    "kinds = [e.type if e else None for e in oops]\n"
    "traced = [('ZeroDivisionError' in e.stacktrace) if e else None for e in oops]",
    "%%step end\nreport = (messages, kinds, traced)",
]


def test_the_catch_variable_has_metaflows_attributes_and_keeps_its_keys(tmp_path, store):
    from flowmagic import Run

    nb = write_notebook(tmp_path / "catch_attrs.ipynb", CATCH)
    doc = flowmagic_json("run", nb, store=store)
    run = Run(f"CatchAttrs/{doc['run_id']}", root=store)
    assert run.data.report == (["division by zero", None, None], ["builtins.ZeroDivisionError", None, None],
                               [True, None, None])
    caught = run["divide"].tasks()[0].data.oops
    assert caught["type"] == "ZeroDivisionError" and caught["message"] == caught.exception
    with pytest.raises(AttributeError, match="use .exception, .type, .stacktrace"):
        caught.message


@pytest.mark.metaflow
def test_the_catch_variable_reads_the_same_in_metaflow(tmp_path):
    from test_export_metaflow import export_run_and_compare

    nb = write_notebook(tmp_path / "catch_attrs.ipynb", CATCH)
    ours, theirs = export_run_and_compare(nb, tmp_path)
    assert theirs[("end", None)]["report"] == ours[("end", None)]["report"]
    assert theirs[("end", None)]["report"][1] == ["builtins.ZeroDivisionError", None, None]


# --- a value the notebook run only warns about stays out of Metaflow's artifacts (item 6c) ----

@pytest.mark.metaflow
def test_an_unpicklable_value_no_step_reads_does_not_stop_metaflow(tmp_path):

    from flowmagic.export import export_notebook
    from test_export_metaflow import metaflow, metaflow_env

    nb = write_notebook(tmp_path / "locks.ipynb", [
        "import threading",
        "%%step start\nlock = threading.Lock()\nwith lock:\n    total = sum([1, 2, 3])\nsizes = [1, 2]",
        "%%step end\ndone = total * 2",
    ])
    store = tmp_path / "fm"
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0 and "'lock' (_thread.lock) cannot be saved" in proc.stdout + proc.stderr
    script = tmp_path / "flow.py"
    export_notebook(nb, script)
    done = metaflow(script, metaflow_env(tmp_path), "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'lock' (lock) cannot be saved" in done.stdout + done.stderr
    assert artifacts(store, "Locks", 1, "end")[0]["done"] == 12


# --- no noise on ordinary idioms (item 7) ------------------------------------------------

def test_with_as_files_and_client_handles_raise_no_warning_and_handles_reach_later_steps(tmp_path):
    from flowmagic.client import Run, namespace_root

    store = tmp_path / "fm"
    first = write_notebook(tmp_path / "upstream.ipynb", ["%%step start\nscore = 0.9"])
    assert flowmagic("run", first, store=store).returncode == 0
    nb = write_notebook(tmp_path / "idioms.ipynb", [
        "%%step start\nwith open('upstream.ipynb') as f:\n"
        "    size = len(f.read())\nfrom flowmagic import Flow\nupstream = Flow('Upstream').latest_run",
        "%%step end\nscore = upstream.data.score\nwhich = upstream.pathspec",
    ])
    proc = flowmagic("run", nb, store=store, cwd=tmp_path)
    shown = proc.stdout + proc.stderr
    assert proc.returncode == 0, shown
    assert "warning" not in shown and "cannot be saved" not in shown, shown
    namespace_root(store)
    try:
        run = Run("Idioms/1")
        assert run["end"].task.data.score == 0.9 and run["end"].task.data.which == "Upstream/1"
        handle = run["start"].task.data.upstream   # a Client object, stored by pathspec as Metaflow's are
        assert isinstance(handle, Run) and handle.pathspec == "Upstream/1" and handle.data.score == 0.9
    finally:
        namespace_root(None)
