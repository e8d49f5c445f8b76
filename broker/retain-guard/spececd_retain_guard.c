/*
 * SpecECD retain guard: a Mosquitto 2.0 plugin that refuses every retained publish (and every
 * retained Last Will) except on the topic filters given in plugin_opt_retain_allow.
 *
 * Why: a retained message is stored by the broker (in memory and on disk) until someone clears
 * it, and a device may write an unbounded number of topics (one `up` topic per session id), so
 * a device that retains fills the broker (issue 10, attack 7: 300 x 1 MB). Mosquitto's own
 * retain_available is global and the workers' status topics need retain; neither acl_file nor
 * the 2.0 dynamic-security plugin looks at the retain flag. This plugin does, and nothing else.
 *
 *   plugin /usr/local/lib/mosquitto/spececd_retain_guard.so
 *   plugin_opt_retain_allow spececd/v1/workers/+/status
 *
 * Load it BEFORE the dynamic-security plugin: Mosquitto asks the plugins in order and the first
 * answer other than "defer" decides. For everything it does not refuse it defers, so who may write
 * where stays the dynamic-security plugin's decision. A refused QoS 1 publish gets a PUBACK with
 * reason "Not authorized" and is not stored.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_ALLOW 16

static mosquitto_plugin_id_t *plugin_id = NULL;
static char *allow[MAX_ALLOW];
static int allow_count = 0;

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static bool allowed(const char *topic)
{
	bool match;
	for(int i = 0; i < allow_count; i++){
		if(mosquitto_topic_matches_sub(allow[i], topic, &match) == MOSQ_ERR_SUCCESS && match){
			return true;
		}
	}
	return false;
}

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	(void)event;
	(void)userdata;

	if(ed->access != MOSQ_ACL_WRITE || !ed->retain || allowed(ed->topic)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "spececd_retain_guard: refused a retained publish from %s on %s",
			mosquitto_client_id(ed->client), ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *opts, int opt_count)
{
	(void)userdata;
	plugin_id = identifier;
	for(int i = 0; i < opt_count; i++){
		if(strcmp(opts[i].key, "retain_allow") != 0) continue;
		/* one filter per option value, or several separated by spaces */
		char *copy = strdup(opts[i].value), *save = NULL;
		if(copy == NULL) return MOSQ_ERR_NOMEM;
		for(char *tok = strtok_r(copy, " ", &save); tok; tok = strtok_r(NULL, " ", &save)){
			if(allow_count == MAX_ALLOW || mosquitto_sub_topic_check(tok) != MOSQ_ERR_SUCCESS){
				mosquitto_log_printf(MOSQ_LOG_ERR, "spececd_retain_guard: bad or too many retain_allow filters at '%s'", tok);
				free(copy);
				return MOSQ_ERR_INVAL;
			}
			allow[allow_count] = strdup(tok);
			if(allow[allow_count] == NULL){ free(copy); return MOSQ_ERR_NOMEM; }
			allow_count++;
		}
		free(copy);
	}
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int opt_count)
{
	(void)userdata;
	(void)opts;
	(void)opt_count;
	for(int i = 0; i < allow_count; i++) free(allow[i]);
	allow_count = 0;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
}
