# The article's application and exception example exactly as published (inline receivers).
from flask import Flask, request, g, got_request_exception
import traceback
from audit_events import access_logged

app = Flask(__name__)

@app.route('/dashboard')
def dashboard():
    g.current_user = request.args.get('user', 'guest')
    access_logged.send('dashboard_module')
    return {'status': 'active', 'user': g.current_user}

def exception_reporter(sender, exception):
    error_details = traceback.format_exception_only(type(exception), exception)
    with open('error_journal.log', 'a') as error_log:
        error_log.write(f"Critical error in {sender}: {''.join(error_details)}\n")

got_request_exception.connect(exception_reporter)

@app.route('/compute')
def compute():
    result = 10 / 0  # Intentional error
    return {'result': result}
