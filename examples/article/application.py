# application.py -- the article's app, with its receivers deferred to RQ workers.
#
#   flask --app application run            # the app
#   python ../../worker.py --app application  # a worker (from this folder)
from flask import Flask, request, g

from audit_events import access_logged
import exception_reporting  # noqa: F401  (registers exception_reporter)
from signal_queue import SignalQueue

app = Flask(__name__)
SignalQueue(app)  # reads SIGNAL_QUEUE_REDIS_URL etc. from the environment

@app.route('/dashboard')
def dashboard():
    g.current_user = request.args.get('user', 'guest')
    access_logged.send('dashboard_module')
    return {'status': 'active', 'user': g.current_user}

@app.route('/compute')
def compute():
    result = 10 / 0  # Intentional error
    return {'result': result}
