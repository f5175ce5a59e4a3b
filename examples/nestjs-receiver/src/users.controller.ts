import {
  BadRequestException, Body, Controller, Delete, Get, Headers, HttpCode, Param, Patch, Post,
  ServiceUnavailableException, UseGuards,
} from '@nestjs/common';
import { ApiKeyGuard, WebhookSignatureGuard } from './new-user-webhook.guard';
import { Profile, ProfilesService } from './profiles.service';

/** The body pg_new_user_hook sends with payload_format = minimal. */
interface UserDto {
  id: string;
  email: string | null;
}

function checked(body: UserDto): UserDto {
  if (typeof body?.id !== 'string' || !(typeof body.email === 'string' || body.email === null)) {
    throw new BadRequestException('expected {"id": string, "email": string | null}');
  }
  return body;
}

/**
 * The users resource pg_new_user_hook calls (payload_format = minimal or fields):
 * POST /users when a user is created, and with pg_new_user_hook.events =
 * 'created,updated,deleted', PATCH /users/:id when the user's email changes and
 * DELETE /users/:id when the user is deleted. Each answers 2xx for an event it has
 * seen before: a duplicate is a success for the sender, which must stop retrying.
 */
@Controller()
export class UsersController {
  /** For the end-to-end test: the first FAIL_FIRST_CREATES creations answer 503. */
  private failCreates = Number(process.env.FAIL_FIRST_CREATES ?? 0);

  constructor(private readonly profiles: ProfilesService) {}

  @Post('users')
  @HttpCode(201)
  @UseGuards(ApiKeyGuard, WebhookSignatureGuard)
  create(@Body() body: UserDto, @Headers('webhook-id') eventId: string): { created: boolean } {
    const user = checked(body);
    if (this.failCreates > 0) {
      this.failCreates -= 1;
      throw new ServiceUnavailableException('try again later');
    }
    return { created: this.profiles.createFromEvent(eventId ?? '', user.id, user.email) };
  }

  @Patch('users/:id')
  @HttpCode(200)
  @UseGuards(ApiKeyGuard, WebhookSignatureGuard)
  update(@Param('id') id: string, @Body() body: UserDto, @Headers('webhook-id') eventId: string): { updated: boolean } {
    const user = checked(body);
    if (user.id !== id) {
      throw new BadRequestException('the body is of another user than the path');
    }
    return { updated: this.profiles.updateFromEvent(eventId ?? '', id, user.email) };
  }

  @Delete('users/:id')
  @HttpCode(204)
  @UseGuards(ApiKeyGuard, WebhookSignatureGuard)
  remove(@Param('id') id: string, @Headers('webhook-id') eventId: string): void {
    this.profiles.deleteFromEvent(eventId ?? '', id);
  }

  /** For the example's end-to-end test (and a human with curl): the profiles now. */
  @Get('profiles')
  @UseGuards(ApiKeyGuard)
  list(): Profile[] {
    return this.profiles.all();
  }
}
